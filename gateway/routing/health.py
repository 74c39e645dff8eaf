"""Active health checks on every instance, every few seconds.

`GET <health path>` must answer 200 (infergate workers: /health); where a
service has no health path (static endpoints by default: Triton and other
servers have their own), a TCP connect is the check. An instance is taken
out after `fall` failed checks in a row and brought back after `rise` good
ones. Checks use their own short connections so that a hung data-plane
connection cannot hide a dead instance.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("infergate.health")


async def probe(ip: str, port: int, path: str | None = "/health", timeout: float = 1.0) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    if path is None:
        writer.close()
        return True
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return len(parts) >= 2 and parts[1] == b"200"
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


class HealthChecker:
    def __init__(self, get_table, on_change, interval: float = 2.0, fall: int = 2, rise: int = 1):
        self.get_table = get_table
        self.on_change = on_change
        self.interval = interval
        self.fall = fall
        self.rise = rise
        self.streak: dict[tuple, int] = {}  # >0 good checks in a row, <0 bad ones
        self.task = None

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self):
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")

    async def check_all(self):
        table = self.get_table()
        pools = list(table.pools.items())
        results = await asyncio.gather(*(probe(p.ip, p.port, p.health_path) for _, p in pools))
        current = set(table.pools)
        for key in [k for k in self.streak if k not in current]:
            del self.streak[key]  # instances that left: a newcomer at that address starts clean
        for (key, pool), ok in zip(pools, results):
            streak = self.streak.get(key, 0)
            streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
            self.streak[key] = streak
            if pool.check_healthy and streak <= -self.fall:
                pool.check_healthy = False
                log.warning("instance %s:%d failed %d health checks: taken out", pool.ip, pool.port,
                            -streak)
                self.on_change(pool)
            elif not pool.check_healthy and streak >= self.rise:
                pool.check_healthy = True
                log.info("instance %s:%d is healthy again", pool.ip, pool.port)
                self.on_change(pool)

    def stop(self):
        if self.task:
            self.task.cancel()

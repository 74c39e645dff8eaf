"""Self-registration of a worker: register, heartbeat, deregister on shutdown."""
from __future__ import annotations

import asyncio
import logging
import time

from ..registry import StoreUnavailable

log = logging.getLogger("infergate.worker")

HEARTBEAT_SECONDS = 1.0
TTL_SECONDS = 3.0


class Registration:
    """Wraps a WorkerApp: same start/stop, plus membership in a registry."""

    def __init__(self, app, registry_url: str, host: str, port: int, weight: int):
        from ..control.registration_client import open_registration_client

        self.app = app
        self.client = open_registration_client(registry_url)
        self.instance = dict(service=app.service, instance_id=f"{host}:{port}", ip=host, port=port,
                             weight=weight, healthy=True, registered_at=time.time(),
                             heartbeat_at=time.time(), meta={})
        self._task = None

    async def start(self) -> None:
        await self.app.start()
        for attempt in range(5):
            try:
                await self.client.register(self.instance, TTL_SECONDS)
                break
            except (OSError, asyncio.TimeoutError, StoreUnavailable) as exc:  # not reachable yet
                if attempt == 4:
                    raise
                log.warning("registration failed (%s); retrying", exc)
                await asyncio.sleep(0.5 * (attempt + 1))
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if not await self.client.heartbeat(self.instance, TTL_SECONDS):
                    await self.client.register(self.instance, TTL_SECONDS)
            except Exception as exc:  # registry away: keep serving, keep trying
                log.warning("heartbeat failed: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            # Leave discovery first so no new traffic arrives, then drain.
            await self.client.deregister(self.instance)
        except Exception as exc:
            log.warning("deregistration failed: %s", exc)
        await self.app.stop()
        await self.client.close()

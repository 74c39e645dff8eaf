"""Self-registration of a worker: register, heartbeat, deregister on shutdown.

A worker joins an existing service only. When the registry answers that the
service does not exist (it was deleted, or never created) the worker logs it
once, stops registering and heartbeating, and keeps serving the clients that
reach it directly; it does not bring the service back as a bare record. Once
joined, it gives up only after GONE_ANSWERS such answers in a row: a Redis that
came back empty says so until a gateway has written its state back.

A worker started without --token takes its service's token from the registry
and follows changes to it, so clients that reach it directly (the SDK's direct
mode) are checked as the gateway checks them.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..registry import StoreUnavailable

log = logging.getLogger("infergate.worker")

HEARTBEAT_SECONDS = 1.0
TTL_SECONDS = 3.0
GONE_ANSWERS = 5


class Registration:
    """Wraps a WorkerApp: same start/stop, plus membership in a registry."""

    def __init__(self, app, registry_url: str, host: str, port: int, weight: int,
                 follow_token: bool = True):
        from ..control.registration_client import open_registration_client

        self.app = app
        self.client = open_registration_client(registry_url)
        self.instance = dict(service=app.service, instance_id=f"{host}:{port}", ip=host, port=port,
                             weight=weight, healthy=True, registered_at=time.time(),
                             heartbeat_at=time.time(),
                             meta={"grpc_port": app.grpc_port} if app.grpc_port else {})
        self.service_gone = False
        self.follow_token = follow_token
        self._task = None

    def _gone(self, exc: Exception) -> None:
        if not self.service_gone:
            self.service_gone = True
            log.warning("not registering in the registry any more: %s. This worker keeps "
                        "serving clients that reach it directly; create the service and "
                        "restart the worker to join it again", exc)

    async def start(self) -> None:
        from ..control.registration_client import ServiceGone

        await self.app.start()
        for attempt in range(5):
            try:
                await self.client.register(self.instance, TTL_SECONDS)
                await self._sync_token()
                break
            except ServiceGone as exc:
                self._gone(exc)
                return
            except (OSError, asyncio.TimeoutError, StoreUnavailable) as exc:  # not reachable yet
                if attempt == 4:
                    raise
                log.warning("registration failed (%s); retrying", exc)
                await asyncio.sleep(0.5 * (attempt + 1))
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        from ..control.registration_client import ServiceGone

        gone_answers = 0
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                if not await self.client.heartbeat(self.instance, TTL_SECONDS):
                    # Unknown or lapsed: join again -- unless the service is gone.
                    await self.client.register(self.instance, TTL_SECONDS)
                gone_answers = 0
                await self._sync_token()
            except ServiceGone as exc:
                gone_answers += 1
                if gone_answers >= GONE_ANSWERS:
                    self._gone(exc)
                    return
            except Exception as exc:  # registry away: keep serving, keep trying
                log.warning("heartbeat failed: %s", exc)

    async def _sync_token(self) -> None:
        if not self.follow_token:
            return
        token = await self.client.service_token(self.app.service)
        if token is not None and token != self.app.token:
            log.info("the service's token %s", "changed" if token else "was removed")
            self.app.token = token

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if not self.service_gone:
            try:
                # Leave discovery first so no new traffic arrives, then drain.
                await self.client.deregister(self.instance)
            except Exception as exc:
                log.warning("deregistration failed: %s", exc)
        await self.app.stop()
        await self.client.close()

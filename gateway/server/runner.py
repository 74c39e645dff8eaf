"""Process lifecycle: uvloop, SIGTERM drain, and N processes on one port."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, Protocol

import uvloop

log = logging.getLogger("infergate")


class App(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


async def _serve(make_app: Callable[[], Awaitable[App]]) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        app = await make_app()
        await app.start()
    except Exception as exc:
        # Port taken, registry unreachable, bad state dir...: one line, exit status 1.
        log.debug("start-up failed", exc_info=True)
        raise StartupError(f"{type(exc).__name__}: {exc}") from None
    await stopping.wait()
    log.info("shutting down: draining in-flight requests")
    await app.stop()


class StartupError(Exception):
    """The app could not start; the message is the one line the user sees."""


def _serve_or_exit(make_app) -> None:
    try:
        uvloop.run(_serve(make_app))
    except StartupError as exc:
        print(f"infergate: cannot start: {exc}", file=sys.stderr)
        sys.exit(1)


def run(make_app: Callable[[], Awaitable[App]], processes: int = 1) -> None:
    """Run the app until SIGTERM/SIGINT; with processes > 1, fork that many copies.

    The apps bind with SO_REUSEPORT, so the kernel spreads connections over them.
    """
    if processes <= 1:
        _serve_or_exit(make_app)
        return
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _serve_or_exit(make_app)
            except SystemExit as exc:
                code = exc.code or 0
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig, _frame):
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for pid in children:
        while True:
            try:
                _, code = os.waitpid(pid, 0)
                status = status or os.waitstatus_to_exitcode(code)
                break
            except InterruptedError:
                continue
    sys.exit(status)

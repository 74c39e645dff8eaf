"""The last step of the chain: send the exchange to an instance, retrying elsewhere.

The state machine itself is compiled (csrc/forward.pyx: connect errors, lost
connections, 5xx and 450 are retried on another instance of the same version,
never the same one twice, within the retry budget and the deadline).
"""
from __future__ import annotations

import asyncio

from .._native.forward import Forwarding
from ..server import error_response


def forward(ex, on_finish):
    """The upstream's answer as a Future, or a Response at once when nothing can take it."""
    if not ex.backend.pools:
        state = "stopped" if ex.backend.status == "Stopped" else "has no instances"
        return on_finish(ex, error_response(503, f"service {ex.backend.name!r} {state}"))
    return Forwarding(ex, asyncio.get_running_loop(), on_finish).start()

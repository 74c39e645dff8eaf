"""The SDK's one exception type, as in eas-prediction: ``PredictException(code, message)``."""
from __future__ import annotations

import json

__all__ = ["PredictException", "from_response"]


class PredictException(Exception):
    """A prediction failed: ``code`` is the HTTP status (or the SDK's stand-in for a
    transport failure: 502 reset/protocol error, 503 connect failure or no instance,
    504 timeout) and ``message`` the server's message.

    Same attributes and ``str()`` as ``eas_prediction.PredictException``.
    """

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"Code: {self.code}, Message: {self.message}"


def from_response(status: int, body: bytes) -> PredictException:
    """The exception for an error answer: the message of a ``{"code", "message"}``
    JSON body when there is one, else the body as text."""
    message = None
    if body[:1] == b"{":
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            message = doc["message"]
    if message is None:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return PredictException(status, message)

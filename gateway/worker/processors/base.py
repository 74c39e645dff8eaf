from __future__ import annotations

from ..model import BadInput, OnnxModel
from ...codec.decompress import DecompressError, TooLarge, decompress
from ...codec.tensors import CodecError


class BodyTooLarge(BadInput):
    """A compressed body inflates past its limits: answered 413."""


def inflate(body: bytes, encoding: str, max_size: int) -> bytes:
    """gateway/codec/decompress.py's decompress, its refusals as the worker answers them."""
    try:
        return decompress(body, encoding, max_size)
    except TooLarge as exc:
        raise BodyTooLarge(str(exc)) from None
    except DecompressError as exc:
        raise BadInput(str(exc)) from None


class Call:
    """One decoded request: checked feeds, the outputs to fetch, and what encoding needs."""

    __slots__ = ("feeds", "output_names", "context", "rows")

    def __init__(self, feeds: dict, output_names: tuple, context=None):
        self.feeds = feeds
        self.output_names = output_names
        self.context = context
        first = next(iter(feeds.values()), None)
        self.rows = first.shape[0] if first is not None and first.ndim else 1

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys may be concatenated along dimension 0 (computed only
        when batching)."""
        feeds = self.feeds
        if len(feeds) == 1:
            for name, a in feeds.items():
                return self.output_names, name, a.dtype, a.shape[1:]
        return (self.output_names,) + tuple(
            (name, a.dtype, a.shape[1:]) for name, a in feeds.items())


class Processor:
    content_type = "application/octet-stream"

    def __init__(self, model: OnnxModel, max_body_size: int = 64 << 20):
        self.model = model
        self.max_body_size = max_body_size  # what a compressed body may inflate to

    def decode(self, body: bytes) -> Call:
        raise NotImplementedError

    def encode(self, call: Call, outputs: list) -> bytes:
        raise NotImplementedError

    def serve(self, body: bytes) -> tuple[bytes, int]:
        """(answer body, rows run) of a request body run alone (on an inference thread)."""
        call = self.decode(body)
        return self.encode(call, self.model.run(call.feeds, call.output_names)), call.rows

    def _call(self, feeds: dict, output_names, context=None) -> Call:
        return Call(self.model.check_feeds(feeds), self.model.check_outputs(output_names), context)


def parse_message(message_type, body: bytes, what: str):
    """Parse protobuf bytes, turning every parse failure into a 400."""
    if not body:
        raise BadInput(f"empty request body: expected a serialized {what}")
    message = message_type()
    try:
        message.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError, sometimes others on odd bytes
        raise BadInput(f"request body is not a valid {what}: {exc}") from None
    return message


__all__ = ["BadInput", "BodyTooLarge", "Call", "CodecError", "Processor", "inflate",
           "parse_message"]

"""Fuzz the data plane's incremental chunked decoder (csrc/proxy/http1.pyx, dechunk).

The first byte picks the body limit (2^0 to 2^23 bytes) and how many bytes arrive at a
time (as a connection's reads); the rest is the encoded body. Refusal: Refused (400, or
413 past the limit). Invariants: fed in pieces it decides exactly as fed whole (its state
between reads is right); an accepted body fits the limit and the bytes it took, and it
took no more than it was given.
"""
import sys

import atheris

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.http1 import Refused, decode_chunked

COVERS = ("csrc/proxy/http1.pyx",)


def decoded(data: bytes, limit: int, step: int):
    try:
        return decode_chunked(data, limit, step)
    except Refused as refusal:
        assert refusal.status in (400, 413), refusal.status
        return refusal.status, str(refusal)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    limit = 1 << (data[0] % 24)
    step = data[0] // 24 + 1
    encoded = data[1:]
    whole = decoded(encoded, limit, 0)
    assert decoded(encoded, limit, step) == whole, (whole, step)
    if isinstance(whole, tuple) and isinstance(whole[0], bytes):
        body, took = whole
        assert len(body) <= limit and len(body) <= took <= len(encoded)
        assert encoded[took - 2:took] == b"\r\n"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

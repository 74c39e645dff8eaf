"""Fuzz the data plane's HTTP/1.1 head parser (csrc/proxy/http1.pyx, parse_head), as a
request head and as an upstream's answer's head.

Refusal: Refused (400, or 431 for a head past 64 KiB or 100 headers). Invariants: an
accepted head ends in its blank line within the input and within 64 KiB; it parses the
same from its own bytes; its method is a token and its target a path; its header names
are tokens and no value holds CR, LF or NUL; it has one framing at most.
"""
import sys

import atheris

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.http1 import Refused, parse_request_head

COVERS = ("csrc/proxy/http1.pyx",)
TCHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check(data: bytes, response: bool) -> None:
    try:
        head = parse_request_head(data, response)
    except Refused as refusal:
        assert refusal.status in (400, 431), refusal.status
        return
    if head is None:
        assert b"\r\n\r\n" not in data[:65536 + 4]
        return
    method, target, minor, headers, length, chunked, size = head
    assert size <= len(data) and size <= 65536 and data[size - 4:size] == b"\r\n\r\n"
    assert parse_request_head(data[:size], response) == head
    assert minor in (0, 1) and len(headers) <= 100
    assert not (chunked and length >= 0)
    if response:
        assert 100 <= target <= 999
    else:
        assert method and set(method) <= TCHARS and target.startswith(b"/")
        assert all(32 < c < 127 for c in target)
    for name, value in headers:
        assert name and set(name) <= TCHARS, name
        assert not set(value) & {0, 10, 13}, value


def TestOneInput(data: bytes) -> None:
    check(data, False)
    check(data, True)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

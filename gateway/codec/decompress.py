"""Compressed request bodies, inflated within bounds: the one decompression a worker does.

A compressed body is small on the wire and may be huge inflated: 61 KB of gzip
became 64 MiB (then 574 MB of parsed JSON), 12.6 MB of snappy 256 MB. So every
body is inflated only up to `output_limit(compressed size, max size)`:

- a size: the service's max body size, what the body may be uncompressed;
- a ratio: MAX_RATIO times the compressed size, beyond a floor of RATIO_FLOOR.
  Tensors rarely compress past 10:1 (float data hardly at all, JSON text 5-20:1),
  while gzip reaches 1000:1 on zeros: 100:1 passes real requests and stops a small
  body from buying a large amount of memory. Below the floor (1 MiB) any ratio
  is allowed: small bodies cost little whatever they inflate to.

Memory stays near the limit: gzip and deflate inflate incrementally and stop one
byte past it; snappy's raw format declares its length first, which is checked
before anything is allocated. Past a limit: `TooLarge`; data that does not
inflate: `DecompressError` (both ValueErrors, naming what is wrong).
"""
from __future__ import annotations

import zlib

import cramjam

MAX_RATIO = 100
RATIO_FLOOR = 1 << 20

ENCODINGS = ("gzip", "deflate", "snappy")
_WBITS = {"gzip": 31, "deflate": 15}  # deflate: the zlib format, as HTTP means it


class DecompressError(ValueError):
    """The body does not inflate: not the encoding it claims, truncated, or trailing data."""


class TooLarge(DecompressError):
    """The body inflates past its size or ratio limit."""


def output_limit(compressed_size: int, max_size: int) -> int:
    """How many bytes a body of `compressed_size` may inflate to."""
    return min(max_size, max(RATIO_FLOOR, MAX_RATIO * compressed_size))


def _too_large(encoding: str, size: int, limit: int, max_size: int) -> TooLarge:
    why = (f"the {max_size}-byte body limit" if limit == max_size else
           f"{limit} bytes ({MAX_RATIO} times its size, at least {RATIO_FLOOR})")
    return TooLarge(f"the {encoding} body ({size} bytes) inflates past {why}")


def decompress(body: bytes, encoding: str, max_size: int) -> bytes:
    """`body` inflated from `encoding` (one of ENCODINGS; snappy is its raw format)."""
    limit = output_limit(len(body), max_size)
    if encoding == "snappy":
        declared = _snappy_length(body)
        if declared > limit:
            raise _too_large(encoding, len(body), limit, max_size)
        try:
            return bytes(cramjam.snappy.decompress_raw(body))
        except Exception as exc:  # cramjam raises its own DecompressionError
            raise DecompressError(f"the body is not valid snappy data: {exc}") from None
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise DecompressError(f"unknown encoding {encoding!r} ({', '.join(ENCODINGS)})")
    inflater = zlib.decompressobj(wbits=wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise DecompressError(f"the body is not valid {encoding} data: {exc}") from None
    if len(plain) > limit:
        raise _too_large(encoding, len(body), limit, max_size)
    if not inflater.eof:
        raise DecompressError(f"the {encoding} body is truncated")
    if inflater.unused_data:
        raise DecompressError(f"the {encoding} body has {len(inflater.unused_data)} bytes "
                              f"after its end")
    return plain


def _snappy_length(body: bytes) -> int:
    """The uncompressed length a raw snappy body declares (a varint of at most 32 bits)."""
    value = 0
    for i in range(min(len(body), 5)):
        value |= (body[i] & 0x7F) << (7 * i)
        if body[i] < 0x80:
            if value >= 1 << 32:
                break
            return value
    raise DecompressError("the body is not valid snappy data: no length header")

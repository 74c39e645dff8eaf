"""Fuzz the bounded decompression of request bodies (gateway/codec/decompress.py), the one
every compressed body a worker takes goes through: gzip and deflate (v2 HTTP bodies) and
raw snappy (EAS PyTorch bodies).

The input's first byte picks the encoding (its low two bits) and whether the rest is a
compressed body (high bit clear) or plain data that is compressed first (high bit set:
then it must come back whole). Refusal: DecompressError (TooLarge among them).
Invariants: nothing inflates past `output_limit` (the size limit and 100:1 beyond 1 MiB),
and plain data within the limits round-trips.
"""
import gzip
import sys
import zlib

import atheris
import cramjam

with atheris.instrument_imports(include=["gateway"]):
    from gateway.codec.decompress import ENCODINGS, DecompressError, decompress, output_limit

COVERS = ("gateway/codec/decompress.py",)
MAX_SIZE = 4 << 20  # a small body limit, so that the size limit is reached too
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress,
            "snappy": lambda plain: bytes(cramjam.snappy.compress_raw(plain))}


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    encoding = ENCODINGS[data[0] % len(ENCODINGS)]
    rest = data[1:]
    body = COMPRESS[encoding](rest) if data[0] & 0x80 else rest
    try:
        plain = decompress(body, encoding, MAX_SIZE)
    except DecompressError:
        assert not data[0] & 0x80 or len(rest) > output_limit(len(body), MAX_SIZE), \
            f"{encoding}: {len(rest)} bytes compressed by us were refused"
        return
    assert len(plain) <= output_limit(len(body), MAX_SIZE)
    if data[0] & 0x80:
        assert plain == rest


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

"""Fuzz the Open Inference Protocol's JSON infer request reader (gateway/codec/oip.py).

`parse_http_infer` takes a client's body: anything wrong must be a CodecError
(the worker's 400), and what it accepts must be consistent: each feed an
ndarray of the declared shape, output names strings, binary flags booleans.
"""
import sys

import atheris
import numpy as np
import orjson

with atheris.instrument_imports(include=["gateway"]):
    from gateway.codec import oip
    from gateway.codec.tensors import CodecError

COVERS = ("gateway/codec/oip.py", "csrc/worker/tensorjson.pyx")


def check_accepted(infer, header) -> None:
    """Invariants of a decoded request (`header`: its JSON, as orjson reads it)."""
    declared = {t["name"]: t for t in header["inputs"]}
    assert list(infer.feeds) == list(declared), "feeds in input order, one per input"
    for name, array in infer.feeds.items():
        assert isinstance(array, np.ndarray)
        assert list(array.shape) == list(declared[name]["shape"]), (name, array.shape)
        assert oip.DTYPES[declared[name]["datatype"]] == array.dtype
    assert all(isinstance(n, str) for n in infer.outputs)
    assert all(isinstance(v, bool) for v in infer.binary.values())
    assert infer.id is None or isinstance(infer.id, str)


def TestOneInput(data: bytes) -> None:
    try:
        infer = oip.parse_http_infer(data, None)
    except CodecError:
        return
    check_accepted(infer, orjson.loads(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

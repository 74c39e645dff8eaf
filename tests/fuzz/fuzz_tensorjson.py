"""Fuzz the JSON tensor reader (csrc/worker/tensorjson.pyx) against orjson, its oracle.

The reader must read exactly the document orjson reads: where orjson refuses
(orjson.JSONDecodeError, the documented refusal) it refuses the same way, and
where orjson accepts it gives the same values, each rectangular array of
numbers as an ndarray (whose values, as lists, equal orjson's).
"""
import sys

import atheris
import numpy as np
import orjson

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.tensorjson import loads

COVERS = ("csrc/worker/tensorjson.pyx",)


def plain(value):
    """`value` with every ndarray as the nested list orjson would give."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def TestOneInput(data: bytes) -> None:
    try:
        expected = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            got = loads(data)
        except orjson.JSONDecodeError:
            return
        raise AssertionError(f"orjson refuses the body, the reader gave {got!r}")
    got = loads(data)
    assert plain(got) == expected, f"the reader gave {got!r}, orjson {expected!r}"
    assert type(got) is type(expected) or isinstance(got, np.ndarray)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

"""The compiled JSON reader of request bodies (csrc/worker/tensorjson.pyx) against orjson:
the same document for every body (its numeric arrays as ndarrays of the same values),
the same error for every bad one, and the memory of a large tensor body bounded."""
import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from gateway._native.tensorjson import loads

numbers = st.one_of(st.integers(-2**64, 2**65),
                    st.floats(allow_nan=False, allow_infinity=False))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6))


@st.composite
def numeric_arrays(draw):
    shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    kind = draw(st.sampled_from([st.integers(-2**60, 2**60), numbers]))
    flat = draw(st.lists(kind, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    it = iter(flat)

    def build(dims):
        return [next(it) for _ in range(dims[0])] if len(dims) == 1 else \
            [build(dims[1:]) for _ in range(dims[0])]
    return build(shape)


documents = st.recursive(st.one_of(scalars, numeric_arrays()),
                         lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                 st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4)),
                         max_leaves=20)


def plain(value):
    """The document with ndarrays as the lists orjson gives."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def same(ours, theirs):
    """Equal, with 1 == 1.0 as Python has it, and -0.0 kept apart from 0.0."""
    assert plain(ours) == theirs
    assert json.dumps(plain(ours)) == json.dumps(theirs) or \
        json.dumps(plain(ours)).replace(".0", "") == json.dumps(theirs).replace(".0", "")


def outcome(read, body):
    try:
        return "ok", read(body)
    except orjson.JSONDecodeError as exc:
        return "error", str(exc)


@settings(max_examples=400, deadline=None)
@given(documents, st.sampled_from([None, 2]), st.booleans())
def test_the_document_is_orjsons(document, indent, spaced):
    body = json.dumps(document, indent=indent,
                      separators=(", ", ": ") if spaced else (",", ":")).encode()
    same(loads(body), orjson.loads(body))


@settings(max_examples=400, deadline=None)
@given(documents, st.data())
def test_a_broken_body_gets_orjsons_answer(document, data):
    body = bytearray(json.dumps(document).encode())
    if body:
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.sampled_from(b"[]{},:\"-.e0 9xtn\\\xff"))
    body = bytes(body)
    ours, theirs = outcome(loads, body), outcome(orjson.loads, body)
    assert ours[0] == theirs[0], (body, ours, theirs)
    if ours[0] == "ok":
        same(ours[1], theirs[1])
    else:
        assert ours[1] == theirs[1]


def test_the_integer_minus_zero_is_zero_in_a_float_array():
    """orjson reads -0 as the integer 0 (no sign), -0.0 as the float; a float array keeps
    that apart (found by hypothesis in CI: the -0 of "[5.9e-124, -0]" came out -0.0)."""
    assert json.dumps(loads(b"[5.964204926351068e-124, -0]").tolist()) == \
        "[5.964204926351068e-124, 0.0]"
    assert json.dumps(loads(b"[0.5, -0.0]").tolist()) == "[0.5, -0.0]"


def test_numeric_arrays_are_ndarrays():
    doc = loads(b'{"inputs": {"images": [[0.5, 1], [2, 3e2]], "ids": [[1, 2]]}, '
                b'"output_filter": ["scores"]}')
    assert doc["inputs"]["images"].dtype == np.float64
    assert doc["inputs"]["images"].tolist() == [[0.5, 1.0], [2.0, 300.0]]
    assert doc["inputs"]["ids"].dtype == np.int64
    assert doc["output_filter"] == ["scores"]
    # What a double cannot hold exactly stays orjson's.
    assert loads(b"[9007199254740993]") == [9007199254740993]
    with pytest.raises(orjson.JSONDecodeError):
        loads(b"[1e400]")


@st.composite
def near_tensors(draw):
    """A rectangular array of numbers up to 6 deep with one sub-array spoiled (an element
    more or fewer, a string, an empty array, a deeper array): orjson's lists, with the
    tensors inside them read as ndarrays."""
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=6))
    kind = draw(st.sampled_from([st.integers(-2**60, 2**60), numbers]))

    def build(dims):
        if len(dims) == 1:
            return draw(st.lists(kind, min_size=dims[0], max_size=dims[0]))
        return [build(dims[1:]) for _ in range(dims[0])]
    document = build(shape)
    target = document
    for _ in range(draw(st.integers(0, len(shape) - 1))):
        target = target[draw(st.integers(0, len(target) - 1))]
    spoil = draw(st.sampled_from(["append", "pop", "string", "empty", "deeper"]))
    if spoil == "append":
        target.append(draw(st.one_of(kind, st.just([1]))))
    elif spoil == "pop":
        target.pop()
    else:
        at = draw(st.integers(0, len(target) - 1))
        target[at] = {"string": "x", "empty": [], "deeper": [target[at]]}[spoil]
    return document


@settings(max_examples=400, deadline=None)
@given(near_tensors(), st.booleans())
def test_a_spoiled_tensor_is_orjsons(document, spaced):
    body = json.dumps(document, separators=(", ", ": ") if spaced else (",", ":")).encode()
    same(loads(body), orjson.loads(body))


def test_a_deep_array_spoiled_at_its_end_is_read_once():
    """32 levels, the innermost spoiled by a string at its end: each level used to read
    all of it again (8 MB: 4 s). The tensors inside are still ndarrays."""
    rows = ",".join(["[0.5,1,2]"] * 1000)
    body = ("[" * 31 + rows + ',"end"' + "]" * 31).encode()
    document = loads(body)
    same(document, orjson.loads(body))
    inner = document
    for _ in range(30):
        assert type(inner) is list and len(inner) == 1
        inner = inner[0]
    assert inner[-1] == "end" and inner[0].dtype == np.float64 and len(inner) == 1001


LONG_ROW = ", ".join(f"{k * 0.37 - 100:.6g}" for k in range(1000))  # read without the GIL


@pytest.mark.parametrize("body", [
    f"[{LONG_ROW}]", f"[[{LONG_ROW}], [{LONG_ROW}]]", f"[[{LONG_ROW}], [{LONG_ROW}, 1]]",
    f'[{LONG_ROW}, "x"]', f"[{LONG_ROW}, [1]]", f"[{LONG_ROW}, 9007199254740993]",
    f"[{LONG_ROW},]", f"[{LONG_ROW}, 1e400]", f"[{LONG_ROW} 1]", f"[{LONG_ROW}",
    f"[\n{LONG_ROW.replace(' ', chr(10))}\n]", f"{{\"a\": [[{LONG_ROW}]], \"b\": [{LONG_ROW}]}}",
    "[" + ", ".join(["7"] * 1000) + "]"])
def test_long_rows_are_orjsons(body):
    ours, theirs = outcome(loads, body.encode()), outcome(orjson.loads, body.encode())
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        same(ours[1], theirs[1])
    else:
        assert ours[1] == theirs[1]

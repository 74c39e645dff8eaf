"""Hostile protobuf wire pieces for property tests of the compiled readers (oipwire, tfwire):
field numbers and varints at the edges of their widths, lengths past the message, shapes
whose product wraps around 2^64. The readers are held to protobuf's own parser: what it
refuses they must refuse (hand to the full path), what they take they must read as it does."""
from __future__ import annotations

from hypothesis import strategies as st


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s go as ten bytes, as protobuf writes them
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def overlong(n: int, size: int) -> bytes:
    """n as a varint padded with continuation bytes to `size` bytes (11 is past any varint)."""
    plain = bytearray(varint(n))
    while len(plain) < size:
        plain[-1] |= 0x80
        plain.append(0)
    return bytes(plain)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(payload)) + payload


# Numbers at the edges: field numbers protobuf refuses (0, 2^29 and past 32 bits, which
# truncate to small ones), dimensions whose products wrap, lengths past the message.
FIELD_NUMBERS = st.one_of(st.integers(0, 12), st.sampled_from(
    [(1 << 29) - 1, 1 << 29, (1 << 32) + 5, (1 << 32) + 7, (1 << 35) + 3, (1 << 61) + 1]))
DIMS = st.one_of(st.integers(0, 4), st.sampled_from(
    [1 << 31, 1 << 32, 1 << 33, (1 << 62) - 1, 1 << 62, (1 << 63) - 1, -1, -(1 << 63)]))
LENGTHS = st.one_of(st.integers(0, 8), st.sampled_from(
    [1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]))


@st.composite
def hostile_field(draw) -> bytes:
    """One field that a well-behaved writer would not send."""
    number = draw(FIELD_NUMBERS)
    kind = draw(st.sampled_from(["varint", "overlong", "length", "fixed", "wire type"]))
    if kind == "varint":
        return tag(number, 0) + varint(draw(LENGTHS))
    if kind == "overlong":
        return tag(number, draw(st.sampled_from([0, 2]))) + overlong(draw(st.integers(0, 3)),
                                                                     draw(st.integers(10, 11)))
    if kind == "length":
        return tag(number, 2) + varint(draw(LENGTHS)) + draw(st.binary(max_size=8))
    if kind == "fixed":
        wire_type = draw(st.sampled_from([1, 5]))
        return tag(number, wire_type) + draw(st.binary(max_size=9))
    return tag(number, draw(st.integers(3, 7))) + draw(st.binary(max_size=4))


def mixed(draw, good: list, hostile_max: int = 2) -> bytes:
    """`good` fields with up to `hostile_max` hostile ones among them, in a drawn order."""
    pieces = list(good) + draw(st.lists(hostile_field(), max_size=hostile_max))
    return b"".join(draw(st.permutations(pieces)))

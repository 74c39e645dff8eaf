"""The compiled gRPC core's HPACK decoder (csrc/server/grpcwire.pyx) on RFC 7541's own
examples, and on header blocks that must be refused. (The HTTP/2 side runs against
grpc-core and nghttp2 clients in test_oip.py.)"""
import pytest

from gateway._native.grpcwire import HpackDecoder


def test_rfc7541_requests_with_huffman_and_the_dynamic_table():
    """Appendix C.4: three requests on one connection, each reusing the table."""
    decoder = HpackDecoder()
    first = decoder.headers(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    assert first == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                     (b":authority", b"www.example.com")]
    second = decoder.headers(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert second == first + [(b"cache-control", b"no-cache")]
    third = decoder.headers(bytes.fromhex(
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
    assert third == [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
                     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]


def test_rfc7541_requests_without_huffman():
    """Appendix C.3: the same requests with literal strings."""
    decoder = HpackDecoder()
    assert decoder.headers(bytes.fromhex(
        "828684410f7777772e6578616d706c652e636f6d"))[-1] == (b":authority", b"www.example.com")
    assert decoder.headers(bytes.fromhex("828684be58086e6f2d6361636865"))[-1] == \
        (b"cache-control", b"no-cache")
    assert decoder.headers(bytes.fromhex(
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"))[-1] == \
        (b"custom-key", b"custom-value")


@pytest.mark.parametrize("block, why", [
    ("be", "an index past the dynamic table"),
    ("00", "a literal without its name"),
    ("000a6b6579", "a name longer than the block"),
    ("0003616263" + "84ffffffff", "a Huffman string holding EOS (30 one bits)"),
    ("3fe21f", "a table size above the SETTINGS value"),
    ("ff8080808080", "an integer that never ends"),
])
def test_malformed_blocks_are_refused(block, why):
    with pytest.raises(ValueError):
        HpackDecoder().headers(bytes.fromhex(block))

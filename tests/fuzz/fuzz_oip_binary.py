"""Fuzz the Open Inference Protocol's binary infer request readers: the compiled
common case (csrc/worker/oipwire.pyx `decode_binary`) and the full reader
(gateway/codec/oip.py `parse_http_infer`), on a body and its
Inference-Header-Content-Length.

The input's first byte says how long the header-length text is; that text
follows, then the body. Refusals: None from `decode_binary` (the worker then
takes the full reader), CodecError from `parse_http_infer`. Whatever the
compiled reader accepts, the full reader must accept too, with equal feeds,
outputs and id: they are two readers of one protocol. Its feeds, answered as
outputs by `encode_binary`, read back equal through the gateway's reader of
answers (`grpc_from_http`).
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.oipwire import Answer, Datatypes, decode_binary, encode_binary
    from gateway.codec import oip
    from gateway.codec.tensors import CodecError
    from gateway.protos import oip_pb2 as pb

COVERS = ("gateway/codec/oip.py", "csrc/worker/oipwire.pyx")
TYPES = Datatypes(oip.DTYPES)


def header_length_as_the_worker_reads_it(text: str) -> int:
    """gateway/worker/oip.py: the fast path is tried when the header's text is an int."""
    try:
        return int(text)
    except ValueError:
        return 0


def TestOneInput(data: bytes) -> None:
    size = data[0] % 24 if data else 0
    text = data[1:1 + size].decode("latin-1")  # an HTTP header value
    body = data[1 + size:]
    length = header_length_as_the_worker_reads_it(text)
    fast = decode_binary(body, length, TYPES) if length else None
    try:
        full = oip.parse_http_infer(body, text)
    except CodecError as exc:
        assert fast is None, f"the compiled reader took what the full one refuses: {exc}"
        return
    if fast is None:
        return
    feeds, wanted, request_id = fast
    assert list(feeds) == list(full.feeds)
    for name, array in feeds.items():
        other = full.feeds[name]
        assert array.dtype == other.dtype and array.shape == other.shape, name
        assert np.array_equal(array, other, equal_nan=array.dtype.kind == "f"), name
    assert tuple(wanted) == full.outputs and request_id == full.id
    names = tuple(feeds)
    answer = Answer("model", "1", names, TYPES)
    body, header_length = encode_binary(answer, names, list(feeds.values()), request_id)
    response = pb.ModelInferResponse()
    oip.grpc_from_http(body, header_length, response)
    assert [o.name for o in response.outputs] == list(names)
    for output, raw in zip(response.outputs, response.raw_output_contents):
        array = feeds[output.name]
        assert list(output.shape) == list(array.shape)
        assert raw == array.astype(array.dtype.newbyteorder("<")).tobytes()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()

"""infergate's wire formats load on every protobuf from 3.20 to 7, beside the clients
users keep installed: eas-prediction (protobuf 3.20.3, whose tf_request.proto defines
ArrayShape and friends in protobuf's default pool, without a package) and tritonclient
and grpcio-health-checking (protobuf 6, default pool too). gateway/protos builds our
types in a pool of its own (see its docstring); here the real packages share a process
with it."""
from __future__ import annotations

import subprocess

from eas_env import REPO, eas_python

BESIDE_EAS = r"""
import google.protobuf
assert google.protobuf.__version__ == "3.20.3", google.protobuf.__version__
from eas_prediction import TFRequest, TorchRequest, tf_request_pb2
from gateway.protos import (caffe_predict_pb2, health_pb2, oip_pb2, pytorch_predict_pb2,
                            tf_predict_pb2)

# The SDK's own requests, as it sends them, read by our modules.
sdk = TFRequest("predict_images")
sdk.add_feed("images", [1, 3], TFRequest.DT_FLOAT, [0.5, 1.5, 2.5])
ours = tf_predict_pb2.PredictRequest.FromString(sdk.to_string())
assert ours.signature_name == "predict_images"
assert list(ours.inputs["images"].float_val) == [0.5, 1.5, 2.5]
assert list(ours.inputs["images"].array_shape.dim) == [1, 3]
assert ours.inputs["images"].dtype == tf_predict_pb2.DT_FLOAT

torch = TorchRequest()
torch.add_feed(0, [2], TorchRequest.DT_INT64, [7, 8])
theirs = pytorch_predict_pb2.PredictRequest.FromString(torch.to_string())
assert list(theirs.inputs[0].int64_val) == [7, 8]

# Ours, read by the SDK's.
answer = tf_predict_pb2.PredictResponse()
answer.outputs["scores"].dtype = tf_predict_pb2.DT_FLOAT
answer.outputs["scores"].float_val.extend([0.25, 0.75])
back = tf_request_pb2.PredictResponse.FromString(answer.SerializeToString())
assert list(back.outputs["scores"].float_val) == [0.25, 0.75]

request = oip_pb2.ModelInferRequest(model_name="digits")
request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
assert oip_pb2.ModelInferRequest.FromString(request.SerializeToString()) == request
assert health_pb2.HealthCheckResponse.SERVING == 1
caffe = caffe_predict_pb2.PredictRequest(input_name=["data"])
caffe.input_data.add(data=[1.0, 2.0]).shape.dim.extend([1, 2])
assert caffe_predict_pb2.PredictRequest.FromString(caffe.SerializeToString()) == caffe
assert tf_predict_pb2.PredictRequest.InputsEntry.DESCRIPTOR.GetOptions().map_entry
print("ok")
"""


def test_wire_modules_load_beside_eas_prediction_on_protobuf_3_20():
    proc = subprocess.run([eas_python(), "-c", BESIDE_EAS], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_wire_modules_load_beside_tritonclient_and_grpc_health():
    """In this environment: protobuf 6, tritonclient's protos and grpcio-health-checking's
    in the default pool; our health answer is theirs on the wire."""
    import google.protobuf
    from grpc_health.v1 import health_pb2 as grpc_health
    from tritonclient.grpc import service_pb2

    from gateway.protos import health_pb2, oip_pb2

    assert int(google.protobuf.__version__.split(".")[0]) >= 5
    ours = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    theirs = grpc_health.HealthCheckResponse.FromString(ours.SerializeToString())
    assert theirs.status == grpc_health.HealthCheckResponse.NOT_SERVING
    request = service_pb2.ModelInferRequest(model_name="digits", id="7")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    read = oip_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert (read.model_name, read.id, list(read.inputs[0].shape)) == ("digits", "7", [1, 784])

"""infergate's wire formats load on every protobuf from 3.20 to 7, beside the clients
users keep installed: eas-prediction (protobuf 3.20.3, whose tf_request.proto defines
ArrayShape and friends in protobuf's default pool, without a package) and tritonclient
and grpcio-health-checking (protobuf 6, default pool too). gateway/protos builds our
types in a pool of its own (see its docstring); here the real packages share a process
with it."""
from __future__ import annotations

import subprocess
import sys

from eas_env import REPO, eas_python
from test_eas_compat import digits  # noqa: F401  (a fixture)

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


def _protobuf_3_20(tmp_path) -> dict:
    """An environment whose `google.protobuf` is eas-prediction's 3.20.3 (a path entry in
    front of ours holding only that package: what `pip install eas-prediction` after
    infergate leaves), checked to be what the processes import."""
    import os

    site = subprocess.run([eas_python(), "-c", "import google.protobuf, os; print(os.path."
                           "dirname(google.protobuf.__file__))"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / "google").mkdir(parents=True)
    (tmp_path / "google" / "protobuf").symlink_to(site)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    version = subprocess.run([sys.executable, "-c", "import google.protobuf as p, "
                              "gateway.codec.oip, gateway.proxy.grpc_front; print(p.__version__)"],
                             capture_output=True, text=True, env=env, cwd=REPO)
    assert version.stdout.strip() == "3.20.3", version.stderr
    return env


def test_a_gateway_and_workers_on_protobuf_3_20_serve_eas_prediction(tmp_path, digits):
    """infergate's worker (TF and PyTorch protobuf formats) and gateway running on
    protobuf 3.20.3 answer the unchanged eas-prediction SDK with onnxruntime's numbers."""
    from conftest import Proc, free_port, infergate_cmd
    from gateway.models import DIGITS_MODEL
    from gateway_helpers import endpoints, seed_services, start_gateway
    from test_eas_compat import assert_scores, case, run_cases

    env = _protobuf_3_20(tmp_path / "pb")
    started = []

    class Starter:
        def start(self, args, port, **kw):
            started.append(Proc(args, port, env=env, **kw))
            return started[-1]

    try:
        workers = {}
        for processor in ("tensorflow", "pytorch"):
            port = free_port()
            workers[processor] = Starter().start(infergate_cmd(
                "worker", "--service", "digits", "--model", str(DIGITS_MODEL), "--processor",
                processor, "--port", str(port)), port)
        state = str(tmp_path / "state")
        seed_services(state, [{"name": "digits", "config": {
            "name": "digits", "processor": "tensorflow",
            "endpoints": endpoints(workers["tensorflow"])}}])
        gateway = start_gateway(Starter(), state)
        x, expected = digits
        batch = x[:3]
        results = run_cases(tmp_path, [case(gateway.url, "tf", batch),
                                       case(workers["tensorflow"].url, "tf", batch),
                                       case(workers["pytorch"].url, "torch", batch)])
        for result in results:
            assert_scores(result, expected(batch))
    finally:
        for proc in reversed(started):
            proc.stop()

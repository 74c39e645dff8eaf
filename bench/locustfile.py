"""Locust load test: TF requests with real digits through the gateway.

    locust -f bench/locustfile.py --headless -u 32 -r 8 -t 30s \
        --host http://127.0.0.1:8080

Environment: INFERGATE_SERVICE (default "digits"), INFERGATE_TOKEN (service
token, sent as the EAS signature when set).
"""
from __future__ import annotations

import os

import numpy as np
from locust import FastHttpUser, between, task

from gateway.auth import sign
from gateway.codec.tensors import encode_array
from gateway.protos import tf_predict_pb2 as pb

SERVICE = os.environ.get("INFERGATE_SERVICE", "digits")
TOKEN = os.environ.get("INFERGATE_TOKEN", "")


def _bodies(count: int = 64) -> list[bytes]:
    try:
        from gateway.models import load_digits_split

        images = load_digits_split()[2][:count]
    except ImportError:  # scikit-learn absent: random images still exercise the path
        images = np.random.default_rng(0).random((count, 784))
    bodies = []
    for image in images.astype(np.float32):
        request = pb.PredictRequest(signature_name="predict_images")
        encode_array(image[None, :], request.inputs["images"])
        bodies.append(request.SerializeToString())
    return bodies


BODIES = _bodies()


class PredictUser(FastHttpUser):
    wait_time = between(0, 0.01)

    def on_start(self):
        self.i = 0

    @task
    def predict(self):
        body = BODIES[self.i % len(BODIES)]
        self.i += 1
        headers = sign(TOKEN, body, SERVICE) if TOKEN else {}
        with self.client.post(f"/api/predict/{SERVICE}", data=body, headers=headers,
                              catch_response=True, name="predict") as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            out = pb.PredictResponse()
            out.ParseFromString(resp.content)
            if "scores" not in out.outputs:
                resp.failure("response has no scores")

"""infergate's client SDK: the surface of ``eas-prediction``, plus numpy and asyncio.

    from gateway.sdk import PredictClient, TFRequest, ENDPOINT_TYPE_DIRECT

    client = PredictClient("http://127.0.0.1:8080", "digits")
    client.set_token(token)
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
    client.init()
    req = TFRequest("predict_images")
    req.add_feed("images", images)            # a float32 [N, 784] array
    scores = client.predict(req).get_array("scores")

``AsyncPredictClient`` (``gateway.sdk.aio``) offers the same with ``await``.
"""
from .client import PredictClient
from .core import ENDPOINT_TYPE_DEFAULT, ENDPOINT_TYPE_DIRECT, ENDPOINT_TYPE_GATEWAY
from .errors import PredictException
from .requests import (CaffeRequest, CaffeResponse, InferRequest, InferResponse, Request,
                       Response, StringRequest, StringResponse, TFRequest, TFResponse,
                       TorchRequest, TorchResponse)


def __getattr__(name: str):
    # The asyncio client is imported on first use.
    if name == "AsyncPredictClient":
        from .aio import AsyncPredictClient
        return AsyncPredictClient
    raise AttributeError(name)


__all__ = [
    "PredictClient", "AsyncPredictClient", "PredictException",
    "ENDPOINT_TYPE_GATEWAY", "ENDPOINT_TYPE_DIRECT", "ENDPOINT_TYPE_DEFAULT",
    "Request", "Response", "StringRequest", "StringResponse", "TFRequest", "TFResponse",
    "TorchRequest", "TorchResponse", "CaffeRequest", "CaffeResponse", "InferRequest",
    "InferResponse",
]

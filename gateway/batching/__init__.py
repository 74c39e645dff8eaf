"""Server-side batching for model workers (issue 6, SPEC section 4).

`BatchingRunner(model, settings, decode, whole).submit(deadline, body, finish, ...)`
(or `.infer(call, deadline)`) merges queued requests with equal `Call.batch_key`
along dimension 0, pads them to a batch size, runs the model once per batch on
its rpc.worker_threads threads and splits the outputs back.
"""
from .batcher import BatchingRunner

__all__ = ["BatchingRunner"]

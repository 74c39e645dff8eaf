"""Model warm-up: one run at each batch size the worker will use, before it is ready.

Execution providers do their expensive work on the first run of each input
shape (cuDNN searches convolution algorithms, TensorRT builds engines, arenas
grow): hundreds of milliseconds that would otherwise land on the first
clients. The worker runs the model once per batch size on zeros (dynamic
trailing dimensions as 1) before /ready answers 200 and before it registers,
as Triton's model warm-up does. A size the model refuses is logged and skipped.
"""
from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("infergate.worker")


def warm_up_feeds(model, rows: int) -> dict:
    """Zeros (empty strings for string inputs) shaped as the model takes `rows` rows."""
    feeds = {}
    for spec in model.inputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if shape and spec.shape[0] < 0:
            shape[0] = rows
        if spec.dtype == np.dtype(object):
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


class WarmUp:
    def __init__(self, model, batch_sizes):
        self.model = model
        self.batch_sizes = tuple(batch_sizes) if model is not None else ()
        self.warmed = 0
        self.done = model is None

    def progress(self) -> str:
        return f"warming up: {self.warmed} of {len(self.batch_sizes)} batch sizes run"

    def run(self) -> None:
        """Run once per batch size (on a thread: it may take seconds on a GPU)."""
        started = time.perf_counter()
        for rows in self.batch_sizes:
            try:
                self.model.run(warm_up_feeds(self.model, rows), self.model.output_names)
            except Exception as exc:
                log.warning("warm-up at batch size %d failed (requests of that size will take "
                            "the first-run cost): %s", rows, exc)
            self.warmed += 1
        if self.batch_sizes:
            log.info("warmed up at batch sizes %s in %.0f ms on %s",
                     ",".join(map(str, self.batch_sizes)), (time.perf_counter() - started) * 1e3,
                     self.model.provider)
        self.done = True

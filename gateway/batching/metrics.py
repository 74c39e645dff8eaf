"""Prometheus metrics of the batcher: plain counters, families built at scrape time.

Everything here is updated by the batch threads under the batcher's one lock,
once per batch, instead of a lock per metric and label as prometheus-client's
metric objects take. Mean batch size (padded rows included) =
infergate_worker_batch_rows_sum / infergate_worker_batch_rows_count; rows/s of
requests = rate(infergate_worker_batched_rows_total).
"""
from __future__ import annotations

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from ..worker.metrics import Histogram

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
WAITS = (.0001, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)

BATCH_ROWS = Histogram(SIZES)
BATCH_REQUESTS = Histogram(SIZES)
QUEUE_WAIT = Histogram(WAITS)
counts = {"rows": 0, "in_flight": 0}


class _Collector:
    def collect(self):
        rows = CounterMetricFamily("infergate_worker_batched_rows",
                                   "Rows run through the model by the batcher")
        rows.add_metric([], counts["rows"])
        in_flight = GaugeMetricFamily("infergate_worker_batches_in_flight",
                                      "Batches running on the model now")
        in_flight.add_metric([], counts["in_flight"])
        return [BATCH_ROWS.family("infergate_worker_batch_rows",
                                  "Rows per model run of the batcher, padding included"),
                BATCH_REQUESTS.family("infergate_worker_batch_requests",
                                      "Requests merged into one model run by the batcher"),
                QUEUE_WAIT.family("infergate_worker_batch_queue_wait_seconds",
                                  "Time a request waited in the batch queue before its batch "
                                  "started"),
                rows, in_flight]


REGISTRY.register(_Collector())

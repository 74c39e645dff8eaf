"""Prometheus metrics of the batcher, registered once at import.

Mean batch size (padded rows included) = infergate_worker_batch_rows_sum /
infergate_worker_batch_rows_count; rows/s of requests =
rate(infergate_worker_batched_rows_total).
"""
from prometheus_client import Counter, Gauge, Histogram

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

BATCH_ROWS = Histogram("infergate_worker_batch_rows", "Rows per model run of the batcher, padding included",
                       buckets=_SIZES)
BATCH_REQUESTS = Histogram("infergate_worker_batch_requests",
                           "Requests merged into one model run by the batcher", buckets=_SIZES)
QUEUE_WAIT = Histogram("infergate_worker_batch_queue_wait_seconds",
                       "Time a request waited in the batch queue before its batch started",
                       buckets=(.0001, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
IN_FLIGHT = Gauge("infergate_worker_batches_in_flight", "Batches running on the model now")
ROWS = Counter("infergate_worker_batched_rows", "Rows run through the model by the batcher")

"""Worker metrics: plain counters on the request path, Prometheus exposition at scrape time.

prometheus-client's metric objects take a lock per update and their values
per label; the request path only bumps a dict entry and a histogram bucket
(under one lock: inference threads count their requests too), and a collector
builds the families when /metrics is read.
"""
from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client.core import REGISTRY, CounterMetricFamily, HistogramMetricFamily

BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0)

_by_status: dict[int, int] = {}
_buckets = [0] * (len(BUCKETS) + 1)
_latency_sum = 0.0
_lock = threading.Lock()


def observe(status: int, seconds: float | None) -> None:
    """Count one answer; `seconds` (None for one refused before it ran) is its latency."""
    global _latency_sum
    with _lock:
        _by_status[status] = _by_status.get(status, 0) + 1
        if seconds is not None:
            _buckets[bisect_left(BUCKETS, seconds)] += 1
            _latency_sum += seconds


class _Collector:
    def collect(self):
        with _lock:
            by_status, counts, latency_sum = dict(_by_status), list(_buckets), _latency_sum
        requests = CounterMetricFamily("infergate_worker_requests",
                                       "Predict requests answered by this worker",
                                       labels=["code"])
        for status, count in sorted(by_status.items()):
            requests.add_metric([str(status)], count)
        cumulative, buckets = 0, []
        for bound, count in zip(BUCKETS + (float("inf"),), counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency = HistogramMetricFamily("infergate_worker_request_seconds",
                                        "Predict latency inside the worker")
        latency.add_metric([], buckets, latency_sum)
        return [requests, latency]


REGISTRY.register(_Collector())

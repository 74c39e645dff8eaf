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


class Histogram:
    """Bucket counts and a sum, bumped without a lock of its own (the caller holds one,
    or is the only writer), exported as a Prometheus family at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family = HistogramMetricFamily(name, documentation)
        family.add_metric([], buckets, self.total)
        return family


_by_status: dict[int, int] = {}
_latency = Histogram(BUCKETS)
_lock = threading.Lock()


def observe(status: int, seconds: float | None) -> None:
    """Count one answer; `seconds` (None for one refused before it ran) is its latency."""
    with _lock:
        _by_status[status] = _by_status.get(status, 0) + 1
        if seconds is not None:
            _latency.observe(seconds)


class _Collector:
    def collect(self):
        requests = CounterMetricFamily("infergate_worker_requests",
                                       "Predict requests answered by this worker",
                                       labels=["code"])
        with _lock:
            for status, count in sorted(_by_status.items()):
                requests.add_metric([str(status)], count)
            latency = _latency.family("infergate_worker_request_seconds",
                                      "Predict latency inside the worker")
        return [requests, latency]


REGISTRY.register(_Collector())

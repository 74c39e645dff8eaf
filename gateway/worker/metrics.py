"""Worker metrics: plain counters on the request path, Prometheus exposition at scrape time.

prometheus-client's metric objects take a lock per update; the request path
only bumps a dict entry and a histogram bucket, and a collector builds the
families when /metrics is read.
"""
from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import REGISTRY, CounterMetricFamily, HistogramMetricFamily

BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0)

_by_status: dict[int, int] = {}
_buckets = [0] * (len(BUCKETS) + 1)
_latency_sum = 0.0


def observe(status: int, seconds: float) -> None:
    global _latency_sum
    _by_status[status] = _by_status.get(status, 0) + 1
    _buckets[bisect_left(BUCKETS, seconds)] += 1
    _latency_sum += seconds


class _Collector:
    def collect(self):
        requests = CounterMetricFamily("infergate_worker_requests",
                                       "Predict requests answered by this worker",
                                       labels=["code"])
        for status, count in sorted(_by_status.items()):
            requests.add_metric([str(status)], count)
        cumulative, buckets = 0, []
        for bound, count in zip(BUCKETS + (float("inf"),), _buckets):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency = HistogramMetricFamily("infergate_worker_request_seconds",
                                        "Predict latency inside the worker")
        latency.add_metric([], buckets, _latency_sum)
        return [requests, latency]


REGISTRY.register(_Collector())

"""Gateway metrics: plain counters on the hot path, Prometheus exposition at scrape time.

prometheus-client's own metric objects take a lock per update; the request
path instead bumps entries of a per-(service, version) list and a collector
turns them into metric families when /metrics is read. What EAS shows its
users derives from these: QPS = rate(infergate_requests_total), 2xx/4xx/5xx
rates by the `code` label, traffic in/out = rate(infergate_*_bytes_total).
"""
from __future__ import annotations

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, \
    HistogramMetricFamily

from .._native.counters import BUCKETS, Series

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

_series: dict[tuple, Series] = {}
_retries: dict[tuple, int] = {}
_instances: dict[tuple, int] = {}
_ejections: dict[str, int] = {}


def series(service: str, version: str) -> Series:
    """The counters of (service, version); callers on the hot path keep them."""
    found = _series.get((service, version))
    if found is None:
        found = _series[(service, version)] = Series()
    return found


def observe(service: str, version: str, status: int, seconds: float, bytes_in: int,
            bytes_out: int) -> None:
    series(service, version).observe(status, seconds, bytes_in, bytes_out)


def retried(service: str, reason: str) -> None:
    key = (service, reason)
    _retries[key] = _retries.get(key, 0) + 1


def ejected(instance: str) -> None:
    _ejections[instance] = _ejections.get(instance, 0) + 1


def instance_up(service: str, instance: str, up: bool) -> None:
    _instances[(service, instance)] = 1 if up else 0


def set_instances(health: dict) -> None:
    """The instances of the new route table, {(service, "ip:port"): healthy}: those that
    left it leave the gauge (a removed instance is not "up")."""
    _instances.clear()
    _instances.update({key: 1 if up else 0 for key, up in health.items()})


class _Collector:
    def collect(self):
        requests = CounterMetricFamily("infergate_requests", "Requests answered by the gateway",
                                       labels=["service", "version", "code"])
        latency = HistogramMetricFamily("infergate_request_seconds", "Gateway request latency",
                                        labels=["service", "version"])
        bytes_in = CounterMetricFamily("infergate_request_bytes", "Request body bytes received",
                                       labels=["service", "version"])
        bytes_out = CounterMetricFamily("infergate_response_bytes", "Response body bytes sent",
                                        labels=["service", "version"])
        for (service, version), s in list(_series.items()):
            for index, count in enumerate(s.codes_by_class[1:], start=1):
                if count:
                    requests.add_metric([service, version, _CLASSES[index - 1]], count)
            cumulative, buckets = 0, []
            for bound, count in zip(BUCKETS + (float("inf"),), s.bucket_counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([service, version], buckets, s.latency_sum)
            bytes_in.add_metric([service, version], s.bytes_in)
            bytes_out.add_metric([service, version], s.bytes_out)
        retries = CounterMetricFamily("infergate_retries", "Requests retried on another instance",
                                      labels=["service", "reason"])
        for (service, reason), count in list(_retries.items()):
            retries.add_metric([service, reason], count)
        up = GaugeMetricFamily("infergate_instance_up", "1 while an instance takes traffic",
                               labels=["service", "instance"])
        for (service, instance), value in list(_instances.items()):
            up.add_metric([service, instance], value)
        ejections = CounterMetricFamily("infergate_outlier_ejections",
                                        "Times outlier detection took an instance out",
                                        labels=["instance"])
        for instance, count in list(_ejections.items()):
            ejections.add_metric([instance], count)
        return [requests, latency, bytes_in, bytes_out, retries, up, ejections]


REGISTRY.register(_Collector())

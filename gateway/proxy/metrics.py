"""Gateway metrics (Prometheus exposition over counters cached per label set).

What EAS shows its users derives from these: QPS = rate(requests_total),
2xx/4xx/5xx rates by the `code` label, traffic in/out = rate(bytes_*_total).
"""
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("infergate_requests_total", "Requests answered by the gateway",
                   ["service", "version", "code"])
LATENCY = Histogram("infergate_request_seconds", "Gateway request latency", ["service"],
                    buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
BYTES_IN = Counter("infergate_request_bytes_total", "Request body bytes received", ["service"])
BYTES_OUT = Counter("infergate_response_bytes_total", "Response body bytes sent", ["service"])
RETRIES = Counter("infergate_retries_total", "Requests retried on another instance",
                  ["service", "reason"])
INSTANCE_UP = Gauge("infergate_instance_up", "1 while an instance takes traffic",
                    ["service", "instance"])

_children: dict = {}


def _child(metric, labels):
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe(service: str, version: str, status: int, seconds: float, bytes_in: int,
            bytes_out: int) -> None:
    _child(REQUESTS, (service, version, f"{status // 100}xx")).inc()
    _child(LATENCY, (service,)).observe(seconds)
    _child(BYTES_IN, (service,)).inc(bytes_in)
    _child(BYTES_OUT, (service,)).inc(bytes_out)


def retried(service: str, reason: str) -> None:
    _child(RETRIES, (service, reason)).inc()


def instance_up(service: str, instance: str, up: bool) -> None:
    _child(INSTANCE_UP, (service, instance)).set(1 if up else 0)

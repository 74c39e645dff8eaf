"""Worker metrics (Prometheus): requests by status class and latency."""
from prometheus_client import Counter, Histogram

REQUESTS = Counter("infergate_worker_requests_total", "Predict requests answered by this worker",
                   ["code"])
LATENCY = Histogram("infergate_worker_request_seconds", "Predict latency inside the worker",
                    buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
_BY_STATUS = {}


def observe(status: int, seconds: float) -> None:
    counter = _BY_STATUS.get(status)
    if counter is None:
        counter = _BY_STATUS[status] = REQUESTS.labels(str(status))
    counter.inc()
    LATENCY.observe(seconds)

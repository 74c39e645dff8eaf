"""Starting a gateway whose state dir is seeded with services, for data-plane tests."""
from __future__ import annotations

import asyncio
import http.client
import json

from conftest import free_port, infergate_cmd


def seed_services(state_dir: str, records: list[dict]) -> None:
    """Write service records into the embedded store as the control plane would."""
    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    async def write():
        store = open_store(state_dir)
        await store.start()
        for record in records:
            await store.put_service(ServiceRecord.from_dict({"status": "Running", **record}))
        await store.close()

    asyncio.run(write())


def start_gateway(procs, state_dir: str, *extra: str):
    port = free_port()
    return procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                     "--state-dir", state_dir, "--admin-token", "admin-secret",
                                     "--health-interval", "0.3", *extra), port)


def post(url: str, body: bytes, headers=None, timeout: float = 10.0):
    """(status, body, headers) of one POST on a fresh connection."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def worker_requests(worker_url: str) -> int:
    """Predict requests a worker answered, from its own /metrics."""
    conn = http.client.HTTPConnection(worker_url.split("//")[1], timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("infergate_worker_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def endpoints(*workers, weights=None):
    weights = weights or [100] * len(workers)
    return [{"ip": "127.0.0.1", "port": w.port, "weight": wt} for w, wt in zip(workers, weights)]


def error_message(body: bytes) -> str:
    return json.loads(body)["message"]

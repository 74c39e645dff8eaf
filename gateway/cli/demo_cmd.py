"""`infergate demo`: the whole system on the embedded defaults, end to end.

Starts a gateway on a fresh embedded store, deploys the bundled digits model
as a service with 2 instances, adds a second version (blue-green) with 20% of
the traffic and a header rule that sends `X-Canary: true` to it, then sends
real held-out digits through the gateway and through the SDK's direct mode
and prints accuracy, latency percentiles and the traffic split observed.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from .errors import NO_RUNTIME, CliError, has_model_runtime


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole system on the embedded defaults",
                       description=__doc__, formatter_class=__import__("argparse").RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=1000, help="requests per phase (default 1000)")
    p.add_argument("--keep", action="store_true", help="leave the gateway running at the end")
    p.set_defaults(run=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"the gateway exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise CliError("the gateway did not start")


def _version_counts(gateway: str, service: str) -> dict[str, float]:
    """Requests answered 2xx per version of `service`, from the gateway's /metrics."""
    with urllib.request.urlopen(gateway + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    counts = {}
    prefix = "infergate_requests_total{"
    for line in text.splitlines():
        if line.startswith(prefix) and f'service="{service}"' in line and 'code="2xx"' in line:
            version = line.split('version="', 1)[1].split('"', 1)[0]
            counts[version] = counts.get(version, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def _phase(client, images: np.ndarray, labels: np.ndarray, count: int) -> dict:
    from ..sdk import TFRequest

    latencies, correct = [], 0
    for i in range(count):
        j = i % len(images)
        request = TFRequest("predict_images")
        request.add_feed("images", images[j:j + 1])
        started = time.perf_counter()
        scores = client.predict(request).get_array("scores")
        latencies.append(time.perf_counter() - started)
        correct += int(scores.argmax() == labels[j])
    ms = np.array(latencies) * 1e3
    return {"accuracy": correct / count, "p50": np.percentile(ms, 50),
            "p99": np.percentile(ms, 99), "rps": count / sum(latencies)}


def run(args) -> int:
    from ..models import DIGITS_MODEL, load_held_out_digits
    from ..sdk import ENDPOINT_TYPE_DIRECT, PredictClient
    from .control_cmds import AdminClient, wait_running

    if not has_model_runtime():  # before any worker is launched to fail on it
        raise CliError(NO_RUNTIME)
    images, labels = load_held_out_digits()
    state = tempfile.mkdtemp(prefix="infergate-demo-")
    port = _free_port()
    gateway = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_urlsafe(16)
    print(f"starting a gateway on {gateway} (embedded store in {state})")
    # The token goes in the environment: off the command line (which every local user
    # can read), and a token starting with "-" is not taken for an option.
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "gateway", "--port",
                             str(port), "--state-dir", state, "--log-level", "WARNING"],
                            env=dict(os.environ, INFERGATE_ADMIN_TOKEN=admin_token))
    try:
        _wait_health(gateway, proc)
        admin = AdminClient(gateway, admin_token)
        service = {"name": "digits", "model_path": str(DIGITS_MODEL), "processor": "tensorflow",
                   "generate_token": "true", "metadata": {"instance": 2, "rpc.keepalive": 5000}}
        print("creating service 'digits' (bundled model, 2 instances)...")
        admin.call("POST", "/admin/services", service)
        view = wait_running(admin, "digits", 60, quiet=True)
        token = view["token"]
        print("creating a second version (blue-green) and releasing 20% of the traffic to it...")
        linked = admin.call("POST", "/admin/services?linked=true",
                            {**service, "metadata": {"instance": 1}})["name"]
        wait_running(admin, linked, 60, quiet=True)
        admin.call("POST", f"/admin/services/{linked}/release", {"weight": 20})
        admin.call("PUT", "/admin/services/digits/rules", [{
            "condition": "#HEADER_x-canary == 'true'", "target": linked,
            "header_name": "X-Routed-By", "header_value": "canary-rule"}])
        time.sleep(0.3)  # the gateway applies changes on notification

        rows = []
        client = PredictClient(gateway, "digits")
        client.set_token(token)
        client.init()
        before = _version_counts(gateway, "digits")
        rows.append(("gateway", _phase(client, images, labels, args.requests)))
        after = _version_counts(gateway, "digits")
        split = {v: after.get(v, 0) - before.get(v, 0) for v in after}

        canary = PredictClient(gateway, "digits")
        canary.set_token(token)
        canary.add_extra_headers({"X-Canary": "true"})
        canary.init()
        before = _version_counts(gateway, "digits")
        rows.append(("gateway, X-Canary: true", _phase(canary, images, labels, args.requests // 5)))
        after = _version_counts(gateway, "digits")
        canary_split = {v: after.get(v, 0) - before.get(v, 0) for v in after}

        direct = PredictClient(gateway, "digits")
        direct.set_token(token)
        direct.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
        direct.init()
        rows.append(("SDK direct mode", _phase(direct, images, labels, args.requests)))
        for c in (client, canary, direct):
            c.destroy()

        print(f"\n{len(images)} held-out digits, one image per request, sequential client\n")
        print(f"{'path':<26}{'accuracy':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
        for name, r in rows:
            print(f"{name:<26}{r['accuracy']:>9.1%}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['rps']:>9.0f}")
        total = sum(split.values()) or 1
        print("\ntraffic split observed through the gateway (release -w 20):")
        for version, n in sorted(split.items()):
            print(f"  {version:<20}{int(n):>6} requests  {n / total:6.1%}")
        total = sum(canary_split.values()) or 1
        print("header rule #HEADER_x-canary == 'true':")
        for version, n in sorted(canary_split.items()):
            print(f"  {version:<20}{int(n):>6} requests  {n / total:6.1%}")
        if args.keep:
            print(f"\ngateway left running at {gateway} (admin token {admin_token}, "
                  f"service token {token}); stop it with Ctrl-C")
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(state, ignore_errors=True)
    return 0

"""Running wrk (Debian's package) against a URL with a fixed POST body, and reading its numbers."""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:  # wrk prints e.g. "-nanus" when it recorded no latency
        return float("nan")
    number, unit = match.groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, body: bytes, connections: int = 32, seconds: int = 5, threads: int = 1,
            headers: dict | None = None, cpu: int | None = None) -> dict:
    """{"rps", "p50_ms", "p99_ms", "errors"} of a wrk run POSTing `body` to `url`."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (scripts/dev.sh bench does)")
    with tempfile.TemporaryDirectory() as tmp:
        body_path = os.path.join(tmp, "body.bin")
        with open(body_path, "wb") as f:
            f.write(body)
        script = os.path.join(tmp, "post.lua")
        header_lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        with open(script, "w") as f:
            f.write(f'local f = io.open("{body_path}", "rb")\nwrk.method = "POST"\n'
                    f'wrk.body = f:read("*all")\nf:close()\n{header_lines}'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
               "-s", script, url]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu)] + cmd
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _seconds(re.search(r"50%\s+(\S+)", out).group(1))
    p99 = _seconds(re.search(r"99%\s+(\S+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
            "errors": int(bad.group(1)) if bad else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def nanmedian(values) -> float:
    """Median of the numbers wrk did report (it prints "-nan" for a percentile now and then)."""
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, title, format)."""
    head = [title for _, title, _ in columns]
    body = [[fmt.format(row[key]) if key in row else "" for key, _, fmt in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def rotated(names: list, round_no: int) -> list:
    """The cases of one round, starting one later each round: no case always runs first,
    or always right after the same other one (on a noisy machine both bias a ratio)."""
    k = round_no % len(names)
    return names[k:] + names[:k]

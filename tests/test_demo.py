"""`infergate demo`, the README's first command, runs end to end."""
import re
import subprocess

from conftest import infergate_cmd


def test_demo_runs_end_to_end():
    result = subprocess.run(infergate_cmd("demo", "--requests", "200"), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for path in ("gateway", "gateway, X-Canary: true", "SDK direct mode"):
        row = re.search(rf"^{re.escape(path)}\s+([\d.]+)%", out, re.M)
        assert row and float(row.group(1)) >= 90.0, out
    release, rule = out.split("(release -w 20):")[1].split("header rule")
    shares = re.findall(r"^  (digits\S*)\s+\d+ requests\s+([\d.]+)%", release, re.M)
    low, high = sorted(float(v) for _, v in shares)
    # Smooth WRR is exact per cycle; a route-table rebuild mid-run (status changes) restarts it.
    assert abs(low - 20.0) <= 2.0 and abs(high - 80.0) <= 2.0, out
    canary = dict(re.findall(r"^  (digits\S*)\s+\d+ requests\s+([\d.]+)%", rule, re.M))
    assert canary["digits"] == "0.0" and sorted(canary.values()) == ["0.0", "100.0"], out

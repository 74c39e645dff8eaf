"""CI for the fuzz harnesses (tests/fuzz/fuzz_*.py, run by tests/fuzz/run.py).

Each harness replays its seeds (tests/fuzz/corpus/<target>/), then fuzzes for a
short fixed budget on the instrumented build, two at a time: all of them take
about a minute and a half on a 2-core machine. A crash (an exception that is not
the parser's documented refusal), a hang (over 1 s for one input) or memory
growth past the RSS limit fails the harness's test, with the reproducer's path.

A finding that is not fixed yet keeps its reproducer under
tests/fuzz/crashes/<target>/: while one of them still fails, that harness's
test is an expected failure that names them, so the rest of CI stays green;
once fixed, the reproducer moves into the seed corpus as a regression seed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "fuzz" / "run.py"
SECONDS_EACH = 6
TARGETS = sorted(p.stem[len("fuzz_"):] for p in (REPO / "tests" / "fuzz").glob("fuzz_*.py"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fuzz") / "results.json"
    done = subprocess.run([sys.executable, str(RUN), "--seconds", str(SECONDS_EACH), "--jobs",
                           "2", "--json", str(out)], cwd=REPO, timeout=1800, capture_output=True,
                          text=True, errors="replace")
    assert out.exists(), f"tests/fuzz/run.py wrote no results:\n{done.stderr[-3000:]}"
    return {r["target"]: r for r in json.loads(out.read_text())}


def open_findings(target: str) -> list:
    """The reproducers under tests/fuzz/crashes/<target>/ that still fail."""
    folder = REPO / "tests" / "fuzz" / "crashes" / target
    files = sorted(str(p) for p in folder.glob("*")) if folder.is_dir() else []
    if not files:
        return []
    done = subprocess.run([sys.executable, str(RUN), "--replay", *files], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return [Path(line.split()[-1]).name for line in done.stdout.splitlines()
            if line.startswith("FAIL ")]


@pytest.mark.parametrize("target", TARGETS)
def test_harness_survives_its_budget(results, target):
    result = results[target]
    if result["ok"]:
        return
    known = open_findings(target)
    if known:
        pytest.xfail(f"open findings in tests/fuzz/crashes/{target}/: {', '.join(known)}")
    pytest.fail(f"fuzz_{target}: {result['problem']}")


def test_seeds_exist_for_every_harness():
    missing = [t for t in TARGETS if not any((REPO / "tests" / "fuzz" / "corpus" / t).glob("*"))]
    assert not missing, f"harnesses without seeds in tests/fuzz/corpus/: {missing}"

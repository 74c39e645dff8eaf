"""bench/fuzz: the fuzz harnesses run longer, and the line coverage each reaches.

`python -m bench fuzz --minutes N` runs every tests/fuzz/fuzz_*.py (two at a
time) so that all of them together take about N minutes of fuzzing, on the
build instrumented for libFuzzer, with CI's limits (1 s an input, the RSS
limit): what they learn stays in build/fuzz/corpus/ for the next run. Then each
harness's corpus (seeds and learned) is replayed on a build with Cython line
tracing under coverage.py, and the table gives, per harness, each project file
it reaches: statements, missed, and the line coverage (for the .pyx modules,
Cython's coverage plugin maps lines back to the .pyx).

See tests/fuzz/run.py; a failing harness is reported with its reproducer.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0,
                        help="fuzzing time for all the harnesses together")
    parser.add_argument("targets", nargs="*", help="harness names; all if none")
    args = parser.parse_args(argv)
    count = len(args.targets) or len(list((ROOT / "tests" / "fuzz").glob("fuzz_*.py")))
    seconds = max(5.0, args.minutes * 60 * JOBS / count)
    print(f"{count} harnesses, {seconds:.0f} s each, {JOBS} at a time", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "run.py"),
                           "--seconds", str(seconds), "--jobs", str(JOBS), "--coverage",
                           *args.targets], cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()

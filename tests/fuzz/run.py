"""Run the fuzz harnesses (tests/fuzz/fuzz_*.py), each in its own libFuzzer process.

Why: the parsers that take a client's bytes must refuse bad input cleanly, and
a test suite only tries the inputs someone thought of. Each harness here runs
for a time budget with libFuzzer's per-input timeout (`-timeout=1`) and RSS
limit (`-rss_limit_mb`, checked every second): an exception that is not the
parser's documented refusal, a hang or memory growth stops it, and the input
that did it is kept under build/fuzz/artifacts/<target>/. Seeds come from
tests/fuzz/corpus/<target>/ (replayed first, each whole); what the fuzzer
learns grows build/fuzz/corpus/<target>/.

The instrumented build. libFuzzer only sees the compiled modules' branches when
they are built with clang's `-fsanitize=fuzzer-no-link`: that is done in a copy
of the source tree, build/fuzz/src (never over the normal build), which the
harness process puts first on sys.path. Those modules call the
`__sanitizer_cov_*` hooks that atheris' own libFuzzer
(`atheris.core_with_libfuzzer`) defines, so the harness process loads that
module with RTLD_GLOBAL before anything else and tells `atheris.Setup` to use it
(atheris would otherwise see a libFuzzer already loaded and take its other
core, which does not run the Python callback). Python modules get atheris'
bytecode instrumentation (`atheris.instrument_imports`) as usual. Without clang
the normal build is fuzzed, with Python instrumentation only (said on stderr).

Coverage (`--coverage`, what `python -m bench fuzz` prints): another copy,
build/fuzz-cov/src, has the compiled modules built with Cython's `linetrace`
directive and CYTHON_TRACE; each harness's corpus is replayed there under
coverage.py with Cython's coverage plugin, which maps lines back to the .pyx.

    python tests/fuzz/run.py [--seconds S] [--jobs J] [--coverage] [target ...]
    python tests/fuzz/run.py --replay FILE ...   (e.g. tests/fuzz/crashes/<target>/*)
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ_DIR = ROOT / "tests" / "fuzz"
BUILD = ROOT / "build" / "fuzz"
COVERAGE_BUILD = ROOT / "build" / "fuzz-cov"

PER_INPUT_TIMEOUT_S = 1
# The harness process, Python, numpy and onnxruntime included (they peak near 120 MB).
# libFuzzer's -malloc_limit_mb is not used: it needs a sanitizer's malloc hooks, which this
# build has not (a single 700 MB allocation passed it); the RSS limit catches such growth.
RSS_LIMIT_MB = 512
MAX_INPUT_BYTES = 8192
STARTUP_SLACK_S = 120    # imports, seed replay, the final merge: on top of the budget


def harnesses(names=()) -> dict:
    """{target: harness path} of tests/fuzz/fuzz_<target>.py (those named, or all)."""
    found = {p.stem[len("fuzz_"):]: p for p in sorted(FUZZ_DIR.glob("fuzz_*.py"))}
    unknown = [n for n in names if n not in found]
    if unknown:
        raise SystemExit(f"no harness tests/fuzz/fuzz_{unknown[0]}.py; have {', '.join(found)}")
    return {n: found[n] for n in names} if names else found


# -- the instrumented copies of the tree ---------------------------------------------------

def _copy_tree(tree: Path, pyx_directive: str | None) -> None:
    """Mirror setup.py, protos/, csrc/ and gateway/ into `tree/src` (build outputs aside),
    writing only what changed, so that setup.py rebuilds only what changed. With
    `pyx_directive`, each .pyx gets it on its `# cython:` line (lines keep their numbers)
    and Cython's C files are made anew there."""
    src = tree / "src"
    wanted = {Path("setup.py")}
    for part in ("protos", "csrc", "gateway"):
        for path in (ROOT / part).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_dir() or "__pycache__" in rel.parts or path.suffix == ".so":
                continue
            if path.suffix == ".c" and pyx_directive:
                continue
            wanted.add(rel)
    for rel in wanted:
        data = original = (ROOT / rel).read_bytes()
        if pyx_directive and rel.suffix == ".pyx":
            first, _, rest = data.partition(b"\n")
            if first.startswith(b"# cython:"):
                data = first + b", " + pyx_directive.encode() + b"\n" + rest
            else:
                data = b"# cython: " + pyx_directive.encode() + b"\n" + data
        target = src / rel
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if data == original:  # its time too, which setup.py compares with its outputs'
            shutil.copystat(ROOT / rel, target)
    for part in ("protos", "csrc", "gateway"):  # sources removed since the last copy
        for path in (src / part).rglob("*.py*"):
            rel = path.relative_to(src)
            if path.is_file() and rel not in wanted and path.suffix in (".py", ".pyx", ".pxd") \
                    and not path.name.endswith("_pb2.py"):
                path.unlink()


def _build(tree: Path, env_extra: dict) -> Path:
    log = tree / "build.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                              cwd=tree / "src", env={**os.environ, **env_extra},
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the build in {tree / 'src'} failed (see {log}):\n{tail}")
    return tree / "src"


def build_instrumented() -> Path | None:
    """build/fuzz/src with the compiled modules instrumented for libFuzzer; None (and
    a note) when there is no clang, and the normal build is fuzzed."""
    if shutil.which("clang") is None:
        print("fuzz: no clang on PATH: fuzzing the normal build, with Python "
              "instrumentation only (scripts/dev.sh test installs clang)", file=sys.stderr)
        return None
    _copy_tree(BUILD, None)
    # (CXXFLAGS and LDCXXSHARED: setuptools builds C++ modules, tensorjson, with these.)
    return _build(BUILD, {"CC": "clang", "CXX": "clang++", "LDSHARED": "clang -shared",
                          "LDCXXSHARED": "clang++ -shared",
                          "CFLAGS": "-fsanitize=fuzzer-no-link",
                          "CXXFLAGS": "-fsanitize=fuzzer-no-link"})


def build_coverage() -> Path:
    """build/fuzz-cov/src with Cython line tracing compiled in (by clang where there is
    one: it builds these modules in a quarter of gcc's time)."""
    _copy_tree(COVERAGE_BUILD, "linetrace=True")
    compiler = {"CC": "clang", "CXX": "clang++", "LDSHARED": "clang -shared",
                "LDCXXSHARED": "clang++ -shared"} if shutil.which("clang") else {}
    trace = "-DCYTHON_TRACE=1 -DCYTHON_TRACE_NOGIL=1"
    return _build(COVERAGE_BUILD, {**compiler, "CFLAGS": trace, "CXXFLAGS": trace})


# -- one harness process -------------------------------------------------------------------

def _child(tree: str, instrumented: bool, harness: str, args: list) -> None:
    """Run `harness` as __main__ with `tree`'s gateway first on sys.path."""
    sys.path[:0] = [tree, str(FUZZ_DIR)]
    if instrumented:
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_GLOBAL)
        import atheris.core_with_libfuzzer  # noqa: F401  (the __sanitizer_cov_* hooks)
        sys.setdlopenflags(flags)
        import atheris
        setup = atheris.Setup
        atheris.Setup = lambda argv, test_one_input, **options: setup(
            argv, test_one_input, internal_libfuzzer=True, **options)
    sys.argv = [harness, *args]
    runpy.run_path(harness, run_name="__main__")


def _limits() -> list:
    return [f"-timeout={PER_INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}"]


def _command(tree: Path | None, harness: Path, args: list) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(tree or ROOT),
            "1" if tree else "0", str(harness), *args]


_STATS = re.compile(r"stat::(number_of_executed_units|peak_rss_mb):\s*(\d+)")
_COV = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


def fuzz_one(target: str, harness: Path, tree: Path | None, seconds: float) -> dict:
    """Replay the seeds, then fuzz for `seconds`: {target, ok, problem, execs, ...}."""
    logs, artifacts = BUILD / "logs", BUILD / "artifacts" / target
    corpus, seeds = BUILD / "corpus" / target, FUZZ_DIR / "corpus" / target
    for folder in (logs, artifacts, corpus):
        folder.mkdir(parents=True, exist_ok=True)
    seed_files = sorted(str(p) for p in seeds.glob("*") if p.is_file()) if seeds.is_dir() else []
    log = logs / f"{target}.log"
    common = [*_limits(), f"-artifact_prefix={artifacts}/"]
    steps = [("seed replay", [*common, *seed_files])] if seed_files else []
    steps.append(("fuzzing", [*common, f"-max_total_time={int(seconds)}",
                              f"-max_len={MAX_INPUT_BYTES}", "-print_final_stats=1",
                              str(corpus), *([str(seeds)] if seed_files else [])]))
    result = {"target": target, "ok": True, "problem": "", "log": str(log), "seeds": len(seed_files)}
    with open(log, "w") as out:
        for step, args in steps:
            out.write(f"=== {step}\n")
            out.flush()
            try:
                done = subprocess.run(_command(tree, harness, args), cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=seconds + STARTUP_SLACK_S)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = "no exit within the budget"
            if code != 0:
                text = log.read_text(errors="replace")
                found = re.findall(r"Test unit written to (\S+)", text)
                result.update(ok=False, problem=f"{step}: exit {code}" + (
                    f"; reproducer {found[-1]}" if found else "") + "\n" + text[-4000:])
                return result
    text = log.read_text(errors="replace")
    stats = dict(_STATS.findall(text))
    cov = _COV.findall(text)
    result.update(execs=int(stats.get("number_of_executed_units", 0)),
                  peak_rss_mb=int(stats.get("peak_rss_mb", 0)),
                  edges=int(cov[-1][0]) if cov else 0, corpus=int(cov[-1][2]) if cov else 0)
    return result


def fuzz_all(targets: dict, seconds: float, jobs: int) -> list:
    tree = build_instrumented()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda item: fuzz_one(item[0], item[1], tree, seconds),
                             targets.items()))


def replay(files: list) -> int:
    """Run each file through the harness of its folder's name (tests/fuzz/crashes/<target>/
    or a corpus folder): exit 0 when none fails."""
    tree = build_instrumented()
    known = harnesses()
    failed = 0
    for file in files:
        target = Path(file).resolve().parent.name
        if target not in known:
            raise SystemExit(f"{file}: its folder names no harness ({', '.join(known)})")
        done = subprocess.run(_command(tree, known[target], [*_limits(), str(file)]), cwd=ROOT,
                              capture_output=True, text=True, errors="replace")
        print(f"{'ok  ' if done.returncode == 0 else 'FAIL'} {target} {file}")
        if done.returncode:
            failed += 1
            print(done.stdout[-2000:] + done.stderr[-2000:])
    return 1 if failed else 0


# -- coverage ------------------------------------------------------------------------------

def _replay_child(tree: str, harness: str, folders: list) -> None:
    """Every file of `folders` through the harness (as imported, not as __main__),
    exceptions ignored: the coverage of what the corpus reaches."""
    sys.path[:0] = [tree, str(FUZZ_DIR)]
    module = runpy.run_path(harness, run_name="fuzz_replay")
    for folder in folders:
        for path in sorted(Path(folder).glob("*")):
            try:
                module["TestOneInput"](path.read_bytes())
            except Exception:  # noqa: BLE001  (crashes are the fuzzing step's business)
                pass


def _covers(harness: Path):
    """A harness's COVERS (the files it is about), read without importing it; None if
    it names none (then every project file its corpus reaches is reported)."""
    for node in ast.parse(harness.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COVERS" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def coverage(targets: dict) -> dict:
    """{target: [(source file, statements, missed, percent)]}: line coverage of the project
    files each harness's seeds and learned corpus reach."""
    tree = build_coverage()
    out = {}
    for target, harness in targets.items():
        data = COVERAGE_BUILD / f"{target}.coverage"
        rc = COVERAGE_BUILD / "coveragerc"
        rc.write_text(f"[run]\nplugins = Cython.Coverage\nsource =\n    {tree}/gateway\n"
                      f"    {tree}/csrc\n[report]\nshow_missing = False\n")
        folders = [str(p) for p in (FUZZ_DIR / "corpus" / target, BUILD / "corpus" / target)
                   if p.is_dir()]
        subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}",
                        f"--data-file={data}", str(Path(__file__).resolve()), "--replay-child",
                        str(tree), str(harness), *folders], cwd=tree, check=True)
        report = COVERAGE_BUILD / f"{target}.json"
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--rcfile={rc}",
                        f"--data-file={data}", "-o", str(report), "-q"], cwd=tree, check=True)
        files = json.loads(report.read_text())["files"]
        covers = _covers(harness)
        rows = []
        for name, info in sorted(files.items()):
            rel = str(Path(name).resolve().relative_to(tree)) if Path(name).is_absolute() \
                else name
            if covers is not None and rel not in covers:
                continue
            summary = info["summary"]
            if covers is None and not summary["covered_lines"]:
                continue
            rows.append((rel, summary["num_statements"], summary["missing_lines"],
                         summary["percent_covered"]))
        out[target] = rows
    return out


def print_coverage(table: dict) -> None:
    print(f"{'harness':<12} {'source':<40} {'lines':>6} {'missed':>7} {'covered':>8}")
    for target, rows in table.items():
        for rel, statements, missed, percent in rows:
            print(f"{target:<12} {rel:<40} {statements:>6} {missed:>7} {percent:>7.1f}%")


def print_results(results: list) -> None:
    print(f"{'harness':<12} {'result':<7} {'seeds':>5} {'execs':>9} {'edges':>6} "
          f"{'corpus':>6} {'peak RSS':>9}")
    for r in results:
        print(f"{r['target']:<12} {'ok' if r['ok'] else 'FAIL':<7} {r['seeds']:>5} "
              f"{r.get('execs', 0):>9} {r.get('edges', 0):>6} {r.get('corpus', 0):>6} "
              f"{r.get('peak_rss_mb', 0):>6} MB")
    for r in results:
        if not r["ok"]:
            print(f"\n--- {r['target']} failed: {r['problem']}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2] == "1", argv[3], argv[4:])
        return 0
    if argv[:1] == ["--replay-child"]:
        _replay_child(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="harness names (fuzz_<name>.py); all if none")
    parser.add_argument("--seconds", type=float, default=10, help="fuzzing time per harness")
    parser.add_argument("--jobs", type=int, default=2, help="harnesses run at once")
    parser.add_argument("--coverage", action="store_true",
                        help="then print the line coverage of each harness's corpus")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--replay", nargs="+", metavar="FILE",
                        help="run these inputs through their folder's harness, no fuzzing")
    options = parser.parse_args(argv)
    if options.replay:
        return replay(options.replay)
    targets = harnesses(options.targets)
    started = time.monotonic()
    results = fuzz_all(targets, options.seconds, options.jobs)
    print_results(results)
    print(f"({len(results)} harnesses in {time.monotonic() - started:.0f} s)")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))
    if options.coverage:
        print()
        print_coverage(coverage(targets))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

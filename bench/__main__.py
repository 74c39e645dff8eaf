"""`python -m bench [name ...] [options]`: run the benchmarks (all by default), one after
another; the options (from the first argument starting with `-`, or after `--`) go to each
of them (e.g. `proxy --rounds 1`, `fuzz --minutes 10`, `proxy -- --rounds 1`)."""
import importlib
import sys


ALL = ("worker", "oip", "proxy", "batching", "sdk", "ratelimit", "chaos", "gpu", "fuzz")


def main() -> None:
    args = sys.argv[1:]
    options = []
    if "--" in args:
        args, options = args[:args.index("--")], args[args.index("--") + 1:]
    else:
        first = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
        args, options = args[:first], args[first:]
    unknown = [name for name in args if name not in ALL]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(ALL)}")
    for name in args or ALL:
        print(f"\n=== bench/{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main(options)


if __name__ == "__main__":
    main()

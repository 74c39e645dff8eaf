"""`python -m bench [name ...] [-- options]`: run the benchmarks (all by default), one after
another; options after `--` go to each of them (e.g. `proxy -- --rounds 1`)."""
import importlib
import sys


ALL = ("worker", "oip", "proxy", "batching", "sdk", "ratelimit", "chaos", "gpu")


def main() -> None:
    args = sys.argv[1:]
    options = []
    if "--" in args:
        args, options = args[:args.index("--")], args[args.index("--") + 1:]
    unknown = [name for name in args if name not in ALL]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(ALL)}")
    for name in args or ALL:
        print(f"\n=== bench/{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main(options)


if __name__ == "__main__":
    main()

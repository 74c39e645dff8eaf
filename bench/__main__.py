"""`python -m bench [name ...]`: run the benchmarks (all by default), one after another."""
import importlib
import sys

ALL = ("worker", "proxy", "batching", "sdk", "ratelimit")


def main() -> None:
    names = sys.argv[1:] or ALL
    for name in names:
        print(f"\n=== bench/{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main([])


if __name__ == "__main__":
    main()

"""`infergate <command>`: each command lives in its own module with add_parser/run."""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from .errors import CliError

# command -> module in gateway.cli that defines `register(subparsers)`.
_COMMAND_MODULES = ("demo_cmd", "gateway_cmd", "worker_cmd", "control_cmds", "models_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergate", description=(
        "infergate: an inference gateway and ONNX Runtime workers speaking the PAI-EAS protocol"))
    parser.add_argument("--version", action="version", version=f"infergate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"gateway.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CliError as exc:
        print(f"infergate {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`infergate models`: the models shipped with infergate and where they lie, so that a
service.json written outside the repository can name one (`"model_path": "<the path>"`;
`infergate models --path digits` prints the path alone, for `$(...)` in a shell)."""
from __future__ import annotations

from .errors import CliError


def register(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models and their paths",
                       description=__doc__)
    p.add_argument("--path", metavar="NAME", help="print the path of model NAME alone")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models import DIGITS_MODEL, INPUT_NAME, OUTPUT_NAME, SIGNATURE_NAME

    bundled = {"digits": (DIGITS_MODEL, f"{INPUT_NAME} FP32 [N, 784] -> {OUTPUT_NAME} FP32 "
                                        f"[N, 10], signature {SIGNATURE_NAME}")}
    if args.path is not None:
        if args.path not in bundled:
            raise CliError(f"no bundled model {args.path!r}; there is {', '.join(bundled)}")
        print(bundled[args.path][0])
        return 0
    for name, (path, what) in bundled.items():
        print(f"{name}\t{path}\t{what}")
    return 0

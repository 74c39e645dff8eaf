"""What the commands share to fail clearly: CliError, and the check for the model runtime
(an extra: infergate[cpu] or infergate[gpu])."""
import importlib.util


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


NO_RUNTIME = ("onnxruntime is not installed: pip install 'infergate[cpu]', or 'infergate[gpu]' "
              "for CUDA")


def has_model_runtime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None

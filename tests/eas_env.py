"""The Python of a separate environment holding the unchanged ``eas-prediction`` SDK.

eas-prediction pins protobuf <= 3.20.3, which cannot share an environment with
infergate's protobuf 5+, so its compatibility tests run small client scripts
with another interpreter. ``eas_python()`` returns it:

1. ``$INFERGATE_EAS_PYTHON`` when set (it must exist);
2. else ``<repo>/.venv-eas/bin/python`` when it exists (``.ci/run`` creates it);
3. else it creates ``<repo>/.venv-eas`` (``python -m venv`` and
   ``pip install eas-prediction``; ``$INFERGATE_EAS_REQUIREMENT`` overrides what
   is installed) and returns its python. Creation needs PyPI.

Run as a script (``python tests/eas_env.py``) it prints the interpreter's path,
creating the environment if needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_DIR = os.path.join(REPO, ".venv-eas")
REQUIREMENT = "eas-prediction"


class EasEnvError(RuntimeError):
    pass


def _python_in(env_dir: str) -> str:
    if os.name == "nt":  # pragma: no cover
        return os.path.join(env_dir, "Scripts", "python.exe")
    return os.path.join(env_dir, "bin", "python")


def _works(python: str) -> bool:
    try:
        proc = subprocess.run([python, "-c", "import eas_prediction, snappy"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def create(env_dir: str = ENV_DIR, requirement: str | None = None) -> str:
    """Create ``env_dir`` with eas-prediction installed; return its python."""
    requirement = requirement or os.environ.get("INFERGATE_EAS_REQUIREMENT", REQUIREMENT)
    # Build next to the target and rename at the end, so that an interrupted
    # creation never leaves a half-made .venv-eas that looks usable.
    parent = os.path.dirname(env_dir) or "."
    build = tempfile.mkdtemp(prefix=".venv-eas-build-", dir=parent)
    try:
        subprocess.run([sys.executable, "-m", "venv", build], check=True, capture_output=True)
        pip = [_python_in(build), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        proc = subprocess.run(pip + [requirement], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise EasEnvError(f"pip install {requirement} failed:\n{proc.stdout}\n{proc.stderr}")
        if not _works(_python_in(build)):
            raise EasEnvError(f"{requirement} installed but `import eas_prediction` fails")
        # venv scripts carry their absolute path; recreate it in place after the rename
        # would be wasteful, so only the interpreter path (a symlink) is used from here.
        if os.path.exists(env_dir):
            raise EasEnvError(f"{env_dir} appeared while it was being created; remove it")
        os.rename(build, env_dir)
    except BaseException:
        subprocess.run(["rm", "-rf", build])
        raise
    # The venv's pyvenv.cfg does not name its own directory, so the renamed
    # environment works as it is; its pip script shebangs point at the build
    # directory, which is why pip is only ever run as `python -m pip`.
    return _python_in(env_dir)


def eas_python() -> str:
    """The interpreter of the eas-prediction environment (see the module docstring)."""
    explicit = os.environ.get("INFERGATE_EAS_PYTHON")
    if explicit:
        if not os.path.exists(explicit):
            raise EasEnvError(f"INFERGATE_EAS_PYTHON={explicit} does not exist")
        return explicit
    python = _python_in(ENV_DIR)
    if os.path.exists(python):
        return python
    return create(ENV_DIR)


if __name__ == "__main__":
    print(eas_python())

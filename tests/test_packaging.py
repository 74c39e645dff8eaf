"""What pip installs: the sdist carries the sources of the compiled hot path and the wire
formats, a wheel built from it (no build isolation: Cython and grpcio-tools come from this
environment, nothing is downloaded) holds every compiled module, without debug info, and
they import outside the repository. One wheel build: about a minute."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_sdist_builds_a_wheel_whose_compiled_modules_import(tmp_path):
    native = sorted(os.path.splitext(os.path.basename(p))[0]
                    for p in glob.glob(os.path.join(REPO, "csrc", "*", "*.pyx")))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    (sdist,) = glob.glob(str(tmp_path / "sdist" / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert sum(n.endswith(".pyx") for n in names) == len(native)
    assert any(n.endswith("protos/oip.proto") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "wheel"), sdist],
                   check=True, capture_output=True, timeout=900)
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        compiled = sorted(n.split("/")[-1].split(".")[0] for n in whl.namelist()
                          if n.startswith("gateway/_native/") and n.endswith(".so"))
        assert compiled == native
        assert "gateway/protos/health_pb2.py" in whl.namelist()
        whl.extractall(tmp_path / "site")
    for so in glob.glob(str(tmp_path / "site" / "gateway" / "_native" / "*.so")):
        sections = subprocess.run(["readelf", "-S", so], capture_output=True, text=True).stdout
        assert ".debug_info" not in sections, so
    imports = "; ".join(f"import gateway._native.{name}" for name in native)
    check = subprocess.run([sys.executable, "-c", imports + "; import gateway, "
                            "gateway.protos.oip_pb2; print(gateway.__file__)"],
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == str(tmp_path / "site" / "gateway" / "__init__.py")

"""Build glue: Cython hot path from csrc/ and protobuf modules from protos/.

Every csrc/PART/NAME.pyx becomes the extension module gateway._native.NAME (PART
names the part of gateway/ it serves), and
every protos/NAME.proto becomes gateway/protos/NAME_pb2.py, so adding a file
is all it takes to add a module.
"""
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def generate_protos():
    """protos/NAME.proto -> gateway/protos/NAME_pb2.py: its FileDescriptorProto, which
    gateway.protos.build() turns into message classes on any protobuf from 3.20 (see
    there why not protoc's Python output). Rewritten only when changed."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = os.path.join(ROOT, "gateway", "protos")
    for proto in sorted(glob.glob(os.path.join(ROOT, "protos", "*.proto"))):
        name = os.path.basename(proto)[:-len(".proto")]
        descriptors = os.path.join(ROOT, "build", f"{name}.desc")
        os.makedirs(os.path.dirname(descriptors), exist_ok=True)
        rc = protoc.main(["grpc_tools.protoc", f"-I{os.path.join(ROOT, 'protos')}",
                          f"--descriptor_set_out={descriptors}", proto])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        with open(descriptors, "rb") as f:
            (file,) = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file
        text = (f'"""protos/{name}.proto, compiled by setup.py (do not edit)."""\n'
                f"from . import build\n\nbuild(globals(), {file.SerializeToString()!r})\n")
        module = os.path.join(out, f"{name}_pb2.py")
        if not os.path.exists(module) or open(module).read() != text:
            with open(module, "w") as f:
                f.write(text)


class BuildPy(build_py):
    def run(self):
        generate_protos()
        super().run()


class BuildExt(build_ext):
    # Editable installs run build_ext but not build_py: generate here too.
    def run(self):
        generate_protos()
        super().run()


def pxd_include_tree() -> str:
    """`cimport gateway._native.NAME` looks for gateway/_native/NAME.pxd on the include
    path, while the declarations sit beside their source (csrc/PART/NAME.pxd): copy them
    into such a tree under build/ (only when changed, so nothing rebuilds needlessly)."""
    tree = os.path.join(ROOT, "build", "pxd")
    target = os.path.join(tree, "gateway", "_native")
    os.makedirs(target, exist_ok=True)
    for pxd in glob.glob(os.path.join(ROOT, "csrc", "*", "*.pxd")):
        copy = os.path.join(target, os.path.basename(pxd))
        with open(pxd, "rb") as f:
            text = f.read()
        if not os.path.exists(copy) or open(copy, "rb").read() != text:
            with open(copy, "wb") as f:
                f.write(text)
    return tree


# The system libraries a module links, by their pkg-config names (Debian's -dev packages,
# which scripts/dev.sh installs).
LIBRARIES = {"grpcwire": ["libnghttp2"]}


def pkg_config(packages: list) -> dict:
    """Extension arguments for system libraries, from pkg-config."""
    import subprocess

    if not packages:
        return {}
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", *packages], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"pkg-config cannot find {' '.join(packages)} (install "
                           f"libnghttp2-dev: scripts/dev.sh does): {exc}") from None
    return {"include_dirs": [f[2:] for f in flags if f.startswith("-I")],
            "library_dirs": [f[2:] for f in flags if f.startswith("-L")],
            "libraries": [f[2:] for f in flags if f.startswith("-l")]}


def extension(pyx: str) -> Extension:
    import numpy

    name = os.path.splitext(os.path.basename(pyx))[0]
    system = pkg_config(LIBRARIES.get(name, []))
    return Extension(f"gateway._native.{name}", [os.path.relpath(pyx, ROOT)],
                     include_dirs=[numpy.get_include(), *system.get("include_dirs", [])],
                     library_dirs=system.get("library_dirs", []),
                     libraries=system.get("libraries", []),
                     # no debug info: it was 12 of a wheel's 15.6 MB unpacked
                     extra_compile_args=["-O3", "-g0"])


def extensions():
    from Cython.Build import cythonize

    modules = [extension(pyx)
               for pyx in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.pyx")))]
    if not modules:  # a wheel without them would fail at import, not here
        raise RuntimeError("no csrc/*/*.pyx to compile: the source tree is incomplete")
    return cythonize(modules, language_level=3, include_path=[pxd_include_tree()],
                     compiler_directives={"boundscheck": False, "wraparound": False})


setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})

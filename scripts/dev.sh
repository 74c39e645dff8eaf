#!/usr/bin/env bash
# Set up from nothing and run: `scripts/dev.sh demo`, `scripts/dev.sh test`, `scripts/dev.sh bench`.
#
# Creates .venv (the project, editable, with the CPU runtime and the test
# extras; INFERGATE_RUNTIME=gpu takes onnxruntime-gpu instead) and .venv-eas (the
# unchanged eas-prediction SDK, which pins an old protobuf, for compatibility
# tests). System packages (libnghttp2-dev, which the gRPC server links; redis-server for the
# Redis tests and bench/chaos; clang for the fuzz harnesses' instrumented build; nginx, wrk and
# h2load for the benchmarks) come from apt when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# apt_install CHECK:PACKAGE...: install PACKAGE unless CHECK is there. CHECK is a command,
# or lib/NAME for a library pkg-config knows (its -dev package).
have() {
    case "$1" in
        lib/*) pkg-config --exists "${1#lib/}" 2>/dev/null ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        have "${pkg%%:*}" || missing+=("${pkg##*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "please install: ${missing[*]}" >&2
        return 1
    fi
}

setup() {
    apt_install pkg-config:pkg-config lib/libnghttp2:libnghttp2-dev
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    # What the install depends on: unchanged since the last one, it is skipped (it recompiles
    # every Cython module, a minute).
    local extras="${INFERGATE_RUNTIME:-cpu},$1" stamp=.venv/.infergate-installed inputs
    inputs=$( { echo "$extras"; cat pyproject.toml setup.py; find csrc protos -type f \
        \( -name '*.pyx' -o -name '*.pxd' -o -name '*.proto' -o -name '*.h' -o -name '*.hpp' \) \
        -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
        return 0
    fi
    .venv/bin/pip install -q --upgrade pip setuptools wheel
    # Build requirements first, so the editable build needs no isolated env.
    .venv/bin/pip install -q "Cython>=3.0" "grpcio-tools>=1.75,<1.80" "numpy>=1.24"
    .venv/bin/pip install -q --no-build-isolation -e ".[$extras]"
    echo "$inputs" > "$stamp"
}

setup_eas() {
    if [ ! -x .venv-eas/bin/python ]; then
        "$PYTHON" -m venv .venv-eas
    fi
    .venv-eas/bin/pip install -q eas-prediction
}

case "${1:-}" in
    demo)
        setup test
        shift
        exec .venv/bin/infergate demo "$@"
        ;;
    test)
        apt_install redis-server:redis-server clang:clang
        setup test
        setup_eas
        shift
        exec .venv/bin/python -m pytest -q "$@"
        ;;
    bench)
        apt_install nginx:nginx wrk:wrk h2load:nghttp2-client redis-server:redis-server clang:clang
        setup test,bench
        shift
        exec .venv/bin/python -m bench "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh demo|test|bench [args]" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# On a lent GPU host, as the last of the device calls (../shared/gpu/README.md): install
# onnxruntime-gpu from the gathered parts, then run the kit's check and bench/gpu, writing
# everything under $OUT. SKIP_INSTALL=1 runs the measurements with what is installed (on the
# CPU too, to try the script out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then
    bash .gpu/kit/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 5; }
    export PYTHONPATH=$PWD:/tmp/site
fi
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ -f .gpu/kit/check.py ]; then
    timeout 240 "$PY" .gpu/kit/check.py > "$OUT/check.txt" 2>&1
    echo "check.py exited $?" >> "$OUT/check.txt"
fi
for procs in 1 ${GPU_PROCESSES:-4}; do
    timeout 240 "$PY" -m bench gpu -- --seconds "${CELL_SECONDS:-3}" --clients 16,64 \
        --client-procs "${CLIENT_PROCS:-8}" --threads 4 --processes "$procs" \
        > "$OUT/bench-gpu-p$procs.txt" 2>&1
    echo "bench gpu --processes $procs exited $?" >> "$OUT/bench-gpu-p$procs.txt"
done
tail -n 12 "$OUT"/bench-gpu-p*.txt

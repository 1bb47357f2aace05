#!/usr/bin/env bash
# GPU checks of the Triton backend, for a lent GPU machine (H100, torch 2.11,
# Triton 3.6, no network, lark not installed). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. installs the wheels carried in .whl/ (lark, ...) without an index;
# 2. makes curvc importable from this checkout without building it (the
#    package maps backends/ into curvc.backends, so a symlinked shim does it);
# 3. runs every CUDA-marked test (the Triton kernels; Shampoo, K-FAC and
#    L-BFGS on the GPU);
# 4. runs benchmarks/step_throughput.py.
# Each stage has its own timeout; the whole script stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/curvc_gpu_check.XXXXXX)

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/wheels" .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi

mkdir -p "$WORK/src/curvc"
for entry in "$PWD"/curvc/*; do
    ln -s "$entry" "$WORK/src/curvc/"
done
ln -s "$PWD/backends" "$WORK/src/curvc/backends"
export PYTHONPATH="$WORK/src:$WORK/wheels${PYTHONPATH:+:$PYTHONPATH}"
export CURVC_CACHE_DIR="$WORK/cache"  # generated modules, fresh for this run

timeout 60 "$PY" - <<'EOF' || exit 1
import torch, triton, curvc
print("torch", torch.__version__, "triton", triton.__version__, "curvc", curvc.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
assert torch.cuda.is_available(), "no CUDA device"
EOF

status=0
echo "== CUDA tests"
timeout 330 "$PY" -m pytest tests/test_triton_backend.py tests/test_kronecker.py \
    tests/test_kfac.py tests/test_secant.py -m cuda -q -p no:cacheprovider \
    -o addopts="" || status=$?

echo "== step throughput"
timeout 90 "$PY" benchmarks/step_throughput.py || status=$?
exit $status

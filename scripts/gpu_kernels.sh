#!/usr/bin/env bash
# Kernel checks and figures on a CUDA machine that lacks the fleet's own dependencies (Ray, pydantic,
# gRPC): only torch, triton, numpy, pytest and hypothesis are needed. A shim package makes
# `moefleet.kernels` (and `moefleet.core`) importable from this checkout without importing the face.
#
#   scripts/gpu_kernels.sh STEP [OUTDIR]
#
# STEP: env | tests | bench (OUTDIR LABEL) | tune-mixtral | tune-deepseek | transport
# OUTDIR (default benchmarks/out) receives logs and JSON.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$ROOT/benchmarks/out}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
mkdir -p "$SHIM/moefleet"
printf '__path__ = [%s, %s]\n' "'$ROOT/moefleet'" "'$ROOT'" > "$SHIM/moefleet/__init__.py"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# Run from the shim's folder: from the checkout's root, `python -m` would put the real moefleet/ first.
cd "$SHIM"
PY=${PY:-python3}

case "${1:-}" in
  env)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    ;;
  tests)
    # Compiled kernels (not the interpreter) on the GPU, compiled by parallel workers (pytest-xdist);
    # --noconftest: the suite's conftest wants Ray.
    # TEST_FILES narrows the run (paths relative to the checkout).
    files=()
    for f in ${TEST_FILES:-tests/unit/test_triton_kernels.py tests/unit/test_fused_experts.py tests/unit/test_launch_config.py tests/gpu}; do
      files+=("$ROOT/$f")
    done
    $PY -m pytest --noconftest -q -p no:cacheprovider --rootdir "$ROOT" -n "${TEST_WORKERS:-8}" --timeout "${TEST_TIMEOUT_S:-300}" --durations=12 "${files[@]}"
    ;;
  bench)
    $PY "$ROOT"/benchmarks/bench_kernels.py --label "${3:-run}" --tokens 1 8 64 256 1024 4096 --extra-tokens 16384 \
      --out "$OUT/kernels_${3:-run}.json"
    ;;
  tune-mixtral)
    $PY -m moefleet.kernels.tune --experts 8 --hidden 4096 --inter 14336 --top-k 2 \
      --tokens ${TUNE_TOKENS:-1 2 4 8 16 32 64 128 256 512 1024 2048 4096} --budget-s "${TUNE_BUDGET_S:-200}" ${TUNE_EXTRA:-}
    ;;
  tune-deepseek)
    $PY -m moefleet.kernels.tune --experts 256 --hidden 7168 --inter 2048 --top-k 8 \
      --tokens ${TUNE_TOKENS:-1 2 4 8 16 32 64 128 256 512 1024 2048 4096 16384} --budget-s "${TUNE_BUDGET_S:-200}" ${TUNE_EXTRA:-}
    ;;
  transport)
    $PY "$ROOT"/benchmarks/bench_gpu_transport.py --out "$OUT/gpu_transport.json"
    ;;
  *)
    echo "usage: $0 env|tests|bench LABEL|tune-mixtral|tune-deepseek|transport [OUTDIR]" >&2
    exit 2
    ;;
esac

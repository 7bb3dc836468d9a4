#!/usr/bin/env bash
# One device call that checks a session's GPU work (run on the lent GPU machine, repo root):
#   1. every GPU test (tests/gpu + the block-sparse kernel tests on CUDA), fixed launch parameters;
#   2. kernel benchmarks with autotuning: the block-sparse sliding window vs FlexAttention / SDPA
#      and, when the module exists, the linear-attention suite (fla from .whl/ when carried).
# Each step has its own time limit so the whole call ends inside the device's per-call limit.
# Logs and JSON land in $OUT (at most 8 files come back).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c "import json, torch, transformers, triton; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__, 'transformers': transformers.__version__}))" | tee "$OUT/env.json"
echo "== GPU tests =="
MNEMO_GPU_TESTS=1 MNEMO_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -x --timeout 120 \
    tests/gpu tests/ops/test_block_sparse_kernel.py ${EXTRA_TESTS:-} 2>&1 | tail -25 | tee "$OUT/pytest_gpu.log"
echo "== block-sparse kernel bench =="
timeout ${SWA_TIMEOUT:-170} python3 -m mnemotorch.cli bench kernels -- --out "$OUT/bench_kernels.json" --skip-correctness \
    --cases ${SWA_CASES:-swa} --lengths ${SWA_LENGTHS:-16384,65536} --windows 1024 --dims 128 --time-budget ${SWA_BUDGET:-120} 2>&1 | grep -v -i warn
if python3 -c "import mnemotorch.bench.linear_attention" 2>/dev/null; then
    echo "== linear-attention bench =="
    timeout ${LIN_TIMEOUT:-150} python3 -m mnemotorch.cli bench linear -- --out "$OUT/bench_linear.json" ${LIN_ARGS:-} 2>&1 | grep -v -i warn | tail -30
fi

#!/usr/bin/env bash
# One device call that checks GPU work (run on the lent GPU machine, repo root), each step under
# its own time limit so the call ends inside the 600 s per-call limit. Steps (STEPS, in order given):
#   tests   -- GPU tests (TESTS, default: routing, LLA, block-sparse bias), fixed launches;
#   swa     -- `mnemo bench kernels` sliding window vs FlexAttention / SDPA (SWA_LENGTHS, SWA_WINDOWS, SWA_DIMS, SWA_ARGS, ...);
#   linear  -- `mnemo bench linear` linear / BASED / decode vs fla (fla from .whl/ when carried);
#   routed  -- `mnemo bench routed --cases routing` (routing-transformer from .peers/routing when carried);
#   lla     -- the LLA case of `mnemo bench linear`;
#   kernels -- `mnemo bench kernels` neighbourhood / power / sliding-window cases (KERNEL_CASES);
#   e2e     -- scripts/diag_linear.py --e2e (linear / BASED vs fla, E2E_LENGTHS, E2E_ARGS e.g. "--chunks 64,128");
#   sweep   -- scripts/diag_linear.py --sweep-case for SWEEP_CASES (per-kernel launch parameters; SWEEP_ARGS e.g.
#              "--sweep-kernels _la_fwd_fused --sweep-length 65536").
# Default "tests routed lla kernels"; scripts/gpu_session.sh is "tests swa linear" over every GPU test.
# At most 8 files land in $OUT (logs + JSON). STEPS ending in "save_cache" also bring back the compile
# caches (scripts/gpu_env.sh says how to carry them into the next call).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/gpu_env.sh"   # wheels, PYTHONPATH, carried compile caches
python3 -c "import json, torch, transformers, triton; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__, 'transformers': transformers.__version__}))" | tee "$OUT/env.json"
STEPS="${STEPS:-tests routed lla kernels}"
for step in $STEPS; do
  case "$step" in
    tests)
      # One pytest process per file, side by side: Triton compilation (most of a GPU test's time) is
      # CPU work and the host has 16 cores. SIGINT at the limit, so pytest still prints its summary.
      echo "== GPU tests =="
      mkdir -p /tmp/gpu_tests; rm -f /tmp/gpu_tests/*.log
      # SHARDS=n spreads each file over n processes (MNEMO_TEST_SHARD in tests/conftest.py).
      for f in ${TESTS:-tests/gpu/test_routing_gpu.py tests/gpu/test_lla_gpu.py tests/gpu/test_block_sparse_bias_gpu.py}; do
        for ((i = 0; i < ${SHARDS:-1}; i++)); do
          ( MNEMO_TEST_SHARD=$i/${SHARDS:-1} MNEMO_GPU_TESTS=1 MNEMO_AUTOTUNE=0 timeout -s INT -k 30 ${TEST_TIMEOUT:-170} \
              python3 -m pytest -v -p no:cacheprovider -rfEx ${PYTEST_ARGS:-} $f > /tmp/gpu_tests/$(basename $f .py).$i.log 2>&1 ) &
        done
      done
      wait
      for l in /tmp/gpu_tests/*.log; do echo "-- $(basename $l .log)"; grep -E "passed|failed|error|PASSED|FAILED|ERROR|XFAIL|XPASS|Interrupt|Error" $l | sed "s#^tests/gpu/##" | tail -40; done \
          | cut -c1-400 > "$OUT/pytest_gpu.log"; cat "$OUT/pytest_gpu.log" ;;
    swa)
      echo "== block-sparse kernel bench (sliding window) =="
      timeout ${SWA_TIMEOUT:-170} python3 -m mnemotorch.cli bench kernels -- --out "$OUT/bench_kernels.json" --skip-correctness \
          --cases ${SWA_CASES:-swa} --lengths ${SWA_LENGTHS:-16384,65536} --windows ${SWA_WINDOWS:-1024} --dims ${SWA_DIMS:-128} ${SWA_ARGS:-} --time-budget ${SWA_BUDGET:-120} \
          2>&1 | grep -v -i warn ;;
    linear)
      echo "== linear-attention bench =="
      timeout ${LIN_TIMEOUT:-150} python3 -m mnemotorch.cli bench linear -- --out "$OUT/bench_linear.json" ${LIN_ARGS:-} 2>&1 \
          | grep -v -i warn | tail -30 ;;
    routed)
      echo "== routed bench =="
      timeout ${ROUTED_TIMEOUT:-140} python3 -m mnemotorch.cli bench routed -- --cases routing --out "$OUT/bench_routed.json" \
          --time-budget ${ROUTED_BUDGET:-100} ${ROUTED_ARGS:-} 2>&1 | grep -v -i warn | tail -12 ;;
    lla)
      echo "== LLA bench =="
      timeout ${LLA_TIMEOUT:-90} python3 -m mnemotorch.cli bench linear -- --skip linear,based,decode --out "$OUT/bench_lla.json" \
          ${LLA_ARGS:-} 2>&1 | grep -v -i warn | tail -8 ;;
    save_cache)
      save_compile_cache ;;
    e2e)
      echo "== linear / BASED end to end vs fla (fixed launches; swept ones when sweep_*.json exist) =="
      timeout ${E2E_TIMEOUT:-120} python3 scripts/diag_linear.py --e2e --lengths ${E2E_LENGTHS:-16384,65536} ${E2E_ARGS:-} 2>&1 | grep -v -i warn | tail -12 ;;
    sweep)
      for c in ${SWEEP_CASES:-linear based}; do
        echo "== launch sweep: $c =="
        timeout ${SWEEP_TIMEOUT:-120} python3 scripts/diag_linear.py --sweep-case $c ${SWEEP_ARGS:-} 2>&1 | grep -v -i warn | tail -14
      done ;;
    kernels)
      echo "== block-sparse bench =="
      timeout ${KERNELS_TIMEOUT:-160} python3 -m mnemotorch.cli bench kernels -- --out "$OUT/bench_kernels.json" --skip-correctness \
          --cases ${KERNEL_CASES:-na1d,na2d,power,swa} --time-budget ${KERNELS_BUDGET:-120} ${KERNELS_ARGS:-} 2>&1 | grep -v -i warn | tail -20 ;;
  esac
done

#!/usr/bin/env bash
# One device call for the neighborhood-attention kernels (run on the GPU machine, repo root):
#   1. GPU tests side by side (one process per shard; NA_TESTS: "path[::sel]|shards" entries), each
#      log kept whole in $OUT/na_logs.tgz;
#   2. scripts/diag_swa.py --na2d (NA2D_ARGS, e.g. "--na2d-variants bwd") and --na1d (graph-timed fast
#      paths, launch variants, generic kernel, dense SDPA; JSON in $OUT/diag_na2d.json, $OUT/diag_na1d.json);
#   3. bench: `mnemo bench kernels --cases na2d,na1d --cuda-graph` ($OUT/bench_kernels.json).
#   4. memory: the fused Titans-memory forward (scripts/diag_memory_fused.py sweep; mnemo bench memory --fused);
#   5. train: the fused Titans-memory training path at 16K (diag_memory_fused.py --train; MEM_VJPS e.g. "triton:adjoint:fold,triton:adjoint:fold:f32").
#   6. host: where the host time of eager NA-2D / NA-1D / sliding-window calls goes (scripts/diag_host.py).
#   7. resources: registers and spills of the compiled kernels (scripts/diag_kernel_resources.py).
#   8. profile: the titans_lmm layer's forward + backward with the fused kernel, kernels by device time (scripts/profile_titans_layer.py;
#      PROFILE_ARGS=--overlap: how much of the other streams' kernel time ran inside the sweep and the walk).
#   9. precision: the fused memory's bf16 errors against the fp32 chunked path per product precision (PREC_PAIRS
#      "state/read,..."; scripts/diag_memory_precision.py).
#  10. inputs: the titans layer with its compiled glue (input path, output gate, gate coefficients) eager / compiled
#      (scripts/diag_titans_inputs.py). PROFILE_ARGS="--by-stack 1 --gaps" groups the profile by op and shows GPU idle time.
#  11. ws: Triton's warp specialisation on the NA-1D / sliding-window kernels, one process per variant (scripts/diag_ws.py).
#  12. walksplit: the Titans walk at 64 / 32 hidden columns, one launch against host-ordered phases, against fp32
#      (scripts/diag_walk_split.py; WALK_ARGS, e.g. "--phase3 registers,recompute --carry 0,1").
#  13. ncu: Nsight Compute's counters of the NA-1D / sliding-window / Titans-memory kernels (scripts/ncu_kernels.py; NCU_CASES).
# STEPS (default "tests na2d na1d"; add "bench", "memory", "gluon", ...) picks the parts. Every part has its own time limit.
# Tests of another family run the same way, e.g. NA_TESTS="tests/gpu/test_memory_fused_gpu.py|1"; NA_TEST_ARGS adds
# pytest arguments, split on spaces (e.g. "-x"); NA_TEST_K a -k expression, spaces kept (e.g. "compiled_inputs or env_switch"). MEM_DIAG=0 skips the memory step's forward sweep (the layer bench alone).
# PTXAS=system builds every kernel with the machine's ptxas (CUDA 13.0 on the lent H100s) instead of Triton's bundled
# one (12.8 in Triton 3.6), through TRITON_PTXAS_PATH; it changes the Titans walk's default width (fused_triton._split_slice).
# PTXAS=blackwell does the same with the ptxas-blackwell Triton bundles beside it (12.9 in Triton 3.6).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/gpu_env.sh"
if [ "${PTXAS:-bundled}" = system ]; then
  export TRITON_PTXAS_PATH="${SYSTEM_PTXAS:-/usr/local/cuda/bin/ptxas}"
  echo "ptxas: $("$TRITON_PTXAS_PATH" --version | tail -1)"
elif [ "${PTXAS:-bundled}" = blackwell ]; then  # the newer ptxas Triton bundles for sm_100 (12.9 in Triton 3.6), for every arch
  export TRITON_PTXAS_PATH="$(python3 -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell"))')"
  echo "ptxas: $("$TRITON_PTXAS_PATH" --version | tail -1)"
fi
L=/tmp/na_logs; rm -rf "$L"; mkdir -p "$L"
for step in ${STEPS:-tests na2d na1d}; do
  case "$step" in
    tests)
      pids=()
      for spec in ${NA_TESTS:-tests/gpu/test_na2d_gpu.py|3 tests/gpu/test_vision_gpu.py|2}; do
        path="${spec%%|*}"; n="${spec##*|}"; [ "$n" = "$spec" ] && n=1
        name="$(echo "$path" | sed 's#.*/##; s/\.py//; s/[^A-Za-z0-9_.-]/_/g' | cut -c1-80)"
        for ((i = 0; i < n; i++)); do
          MNEMO_TEST_SHARD=$i/$n MNEMO_GPU_TESTS=1 MNEMO_AUTOTUNE=0 timeout -s INT -k 20 "${TEST_TIMEOUT:-240}" \
              python3 -m pytest -v -p no:cacheprovider -rfEx ${NA_TEST_ARGS:-} ${NA_TEST_K:+-k "$NA_TEST_K"} "$path" > "$L/$name.$i.log" 2>&1 &
          pids+=($!)
        done
      done
      wait "${pids[@]}"
      for f in "$L"/*.log; do echo "-- $(basename "$f")"; grep -E "passed|failed|FAILED|^E  " "$f" | tail -8 | cut -c1-300; done ;;
    na2d)
      echo "== na2d diag =="
      timeout "${NA2D_TIMEOUT:-150}" python3 scripts/diag_swa.py --na2d --time-budget "${NA2D_BUDGET:-100}" ${NA2D_ARGS:-} > "$L/diag_na2d.out" 2>&1
      grep -v -i warn "$L/diag_na2d.out" | tail -14 | cut -c1-400 ;;
    na1d)
      echo "== na1d diag =="
      MNEMO_NA1D_KERNEL=fast timeout "${NA1D_TIMEOUT:-130}" python3 scripts/diag_swa.py --na1d --time-budget "${NA1D_BUDGET:-90}" > "$L/diag_na1d.out" 2>&1
      grep -v -i warn "$L/diag_na1d.out" | tail -4 | cut -c1-600 ;;
    memory)
      # the fused Titans-memory forward: launch / precision / split sweep, then the layer's inference forward
      # against titans-pytorch (mnemo bench memory --fused); JSON in $OUT/diag_memory_fused.json, $OUT/bench_memory.json
      echo "== fused memory forward =="
      [ "${MEM_DIAG:-1}" = 1 ] && timeout -s KILL "${MEM_DIAG_TIMEOUT:-200}" python3 scripts/diag_memory_fused.py --skip-correctness --sweep --slices 64 --warps 4 \
          --splits "${MEM_SPLITS:-0,64}" --precisions "${MEM_PRECISIONS:-tf32x3/tf32}" ${MEM_SWEEP_ARGS:-} --out "$OUT/diag_memory_fused.json" > "$L/diag_memory.out" 2>&1
      [ "${MEM_DIAG:-1}" = 1 ] && grep -v -i warn "$L/diag_memory.out" | tail -"${MEM_SWEEP_LINES:-8}" | cut -c1-300
      [ "${MEM_BENCH:-1}" = 1 ] && timeout -s KILL "${MEM_BENCH_TIMEOUT:-200}" python3 -m mnemotorch.cli bench memory -- --cases lmm --configs matched,default \
          --lengths "${MEM_LENGTHS:-4096,16384}" --fused --warmup 2 --rep 5 --out "$OUT/bench_memory.json" --time-budget "${MEM_BENCH_BUDGET:-170}" > "$L/bench_memory.out" 2>&1
      [ "${MEM_BENCH:-1}" = 1 ] && grep -E "^lmm" "$L/bench_memory.out" | cut -c1-1200 ;;
    train)
      # the fused training path at 16K: eager and compiled adjoint step, phases, peak ($OUT/diag_memory_train.json)
      echo "== fused memory training =="
      timeout -s KILL "${MEM_TRAIN_TIMEOUT:-240}" python3 scripts/diag_memory_fused.py --skip-correctness --train \
          --train-compile "${MEM_TRAIN_COMPILE:-1,0}" --train-configs "${MEM_TRAIN_CONFIGS:-matched,default}" --vjps "${MEM_VJPS:-triton:adjoint}" --read-vjp-launches "${MEM_READ_VJP_LAUNCHES:-}" --sweep-launch "${MEM_SWEEP_LAUNCH:-}" --sweep-t "${MEM_TRAIN_T:-16384}" --out "$OUT/diag_memory_train.json" > "$L/diag_memory_train.out" 2>&1
      grep -v -i warn "$L/diag_memory_train.out" | tail -10 | cut -c1-700 ;;
    precision)
      # how far the fused memory's bf16 results lie from the fp32 chunked path per product precision ($OUT/diag_memory_precision.json)
      echo "== fused memory precision =="
      timeout -s KILL "${PREC_TIMEOUT:-200}" python3 scripts/diag_memory_precision.py --precisions "${PREC_PAIRS:-tf32x3/tf32,bf16x3/tf32}" \
          --out "$OUT/diag_memory_precision.json" > "$L/diag_memory_precision.out" 2>&1
      grep -v -i warn "$L/diag_memory_precision.out" | python3 -c 'import sys, json
for line in sys.stdin:
    try: r = json.loads(line)
    except ValueError: print(line.rstrip()[:300]); continue
    print(r["precision"], r["kind"], r["config"], r["t"], "worst %.3f of the bound (%s)" % (r["worst_fraction_of_bound"], r["worst"]), "%.1fs" % r["s"])' ;;
    profile)
      # where the titans_lmm layer's forward + backward goes with the fused kernel ($OUT/profile_titans_layer.json)
      echo "== titans layer profile =="
      timeout -s KILL "${PROFILE_TIMEOUT:-150}" python3 scripts/profile_titans_layer.py --length "${PROFILE_T:-16384}" --config "${PROFILE_CONFIG:-matched}" ${PROFILE_ARGS:-} \
          > "$L/profile_titans_layer.out" 2>&1
      grep -v -i warn "$L/profile_titans_layer.out" | cut -c1-200 | head -"${PROFILE_LINES:-32}"
      grep -E "^(overlap|gaps)" "$L/profile_titans_layer.out" | cut -c1-1500 ;;  # (PROFILE_ARGS=--overlap: the second stream beside the walks)
    inputs)
      # the titans layer's forward + backward with its compiled glue on / off (scripts/diag_titans_inputs.py; INPUTS_VARIANTS
      # "eager,inputs,both", INPUTS_CONFIG; $OUT/diag_titans_inputs.json)
      echo "== titans layer glue, eager vs compiled =="
      timeout -s KILL "${INPUTS_TIMEOUT:-150}" python3 scripts/diag_titans_inputs.py --config "${INPUTS_CONFIG:-matched}" \
          --variants "${INPUTS_VARIANTS:-eager,inputs,both}" --out "$OUT/diag_titans_inputs.json" > "$L/diag_titans_inputs.out" 2>&1
      grep -v -i warn "$L/diag_titans_inputs.out" | tail -4 | cut -c1-600 ;;
    host)
      # where the host time of eager calls goes (scripts/diag_host.py; $OUT/diag_host.json)
      echo "== host time =="
      timeout -s KILL "${HOST_TIMEOUT:-150}" python3 scripts/diag_host.py --cases "${HOST_CASES:-na2d,na1d,swa16k}" > "$L/diag_host.out" 2>&1
      grep -v -i warn "$L/diag_host.out" | cut -c1-600 | tail -12 ;;
    resources)
      # registers / spills / shared memory of the compiled memory and attention kernels ($OUT/diag_kernel_resources.json)
      echo "== kernel resources =="
      timeout -s KILL "${RES_TIMEOUT:-200}" python3 scripts/diag_kernel_resources.py > "$L/diag_kernel_resources.out" 2>&1
      grep -v -i warn "$L/diag_kernel_resources.out" | cut -c1-300 | tail -16 ;;
    walksplit)
      echo "== titans walk split =="
      timeout -s KILL "${WALK_TIMEOUT:-400}" python3 scripts/diag_walk_split.py ${WALK_ARGS:-} --out "$OUT/diag_walk_split.json" > "$L/diag_walk_split.out" 2>&1
      grep '^{' "$L/diag_walk_split.out" | cut -c1-300 ;;
    ws)
      # Triton's warp specialisation on the list-free attention kernels, one process per variant (scripts/diag_ws.py;
      # WS_ARGS e.g. "--swa --bwd --variants table,..."; $OUT/diag_ws.json)
      echo "== warp specialisation =="
      timeout -s KILL "${WS_TIMEOUT:-300}" python3 scripts/diag_ws.py ${WS_ARGS:-} > "$L/diag_ws.out" 2>&1
      grep -v -i warn "$L/diag_ws.out" | grep '^{' | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); keep = {k: v for k, v in r.items() if k.endswith('_ms') or k.endswith('tflops') or k in ('variant', 'rc', 'error') or 'err' in k}
    print(json.dumps(keep)[:700])" ;;
    ncu)
      # Nsight Compute's full set on warm kernels (scripts/ncu_kernels.py; NCU_CASES "na1d swa titans", NCU_KERNELS a
      # name regex, NCU_COUNT the launches profiled, NCU_ARGS e.g. "--config default" or "--fwd BM=128,warps=8"): the
      # details page, every raw metric (csv) and the per-instruction SASS samples (gzipped) come back under $OUT
      echo "== ncu =="
      NCU="${NCU_BIN:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)}"
      for c in ${NCU_CASES:-na1d swa}; do
        timeout -s KILL "${NCU_TIMEOUT:-240}" "$NCU" --profile-from-start off --clock-control none --set full --import-source yes \
            --kernel-name "regex:${NCU_KERNELS:-_swa_|_na|_lmm_}" ${NCU_COUNT:+--launch-count "$NCU_COUNT"} -f -o "/tmp/ncu_$c" python3 scripts/ncu_kernels.py --case "$c" ${NCU_ARGS:-} > "$L/ncu_$c.log" 2>&1
        tail -2 "$L/ncu_$c.log" | cut -c1-300
        "$NCU" -i "/tmp/ncu_$c.ncu-rep" --page details > "$OUT/ncu_${c}_details.txt" 2>&1
        "$NCU" -i "/tmp/ncu_$c.ncu-rep" --page raw --csv > "$OUT/ncu_${c}_raw.csv" 2>&1
        "$NCU" -i "/tmp/ncu_$c.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip -c > "$OUT/ncu_${c}_sass.csv.gz"
        grep -E "^  _[a-z_0-9]+|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy" "$OUT/ncu_${c}_details.txt" | head -40
      done ;;
    gluon)
      # the Gluon Hopper forward against the Triton forward (scripts/diag_swa_gluon.py; GLUON_ARGS e.g. "--cases na1d
      # --repeat 3" or '--configs [{"BN":64,"stages":4}]'; $OUT/gluon_sweep.json)
      echo "== gluon forward sweep =="
      timeout -s KILL "${GLUON_TIMEOUT:-300}" python3 scripts/diag_swa_gluon.py --out "$OUT/gluon_sweep.json" ${GLUON_ARGS:-} > "$L/diag_gluon.out" 2>&1
      grep -v -i warn "$L/diag_gluon.out" | tail -${GLUON_TAIL:-30} | cut -c1-400 ;;
    bench)
      echo "== mnemo bench kernels =="
      timeout "${BENCH_TIMEOUT:-200}" python3 -m mnemotorch.cli bench kernels -- --out "$OUT/bench_kernels.json" --skip-correctness \
          --cases "${BENCH_CASES:-na2d,na1d}" --cuda-graph --time-budget "${BENCH_BUDGET:-150}" ${BENCH_ARGS:-} > "$L/bench.out" 2>&1
      grep -v -i warn "$L/bench.out" | grep -E "^[a-z_]+ L=|^  (ours|flex|sdpa)" | cut -c1-400 ;;
  esac
done
(cd "$L" && tar czf "$OUT/na_logs.tgz" .)

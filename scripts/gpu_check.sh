#!/usr/bin/env bash
# Run on the lent GPU machine (torch/triton/transformers preinstalled there, no network):
#   GPU tests, then short real training runs: 1 GPU bf16, and with >= 2 GPUs DDP and FSDP2 under torchrun.
# Writes logs and JSON summaries under $OUT (default: ./gpu_out).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 - <<'PY' > "$OUT/env.json"
import json, platform, subprocess, torch, transformers
try:
    import triton; tv = triton.__version__
except Exception:
    tv = None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpus": smi.splitlines(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
                  "transformers": transformers.__version__, "python": platform.python_version()}, indent=1))
PY
cat "$OUT/env.json"
STATUS=0
echo "== GPU tests =="
python3 -m pytest -q -m "gpu or not gpu" tests/gpu tests/layers tests/models -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    echo "== 1-GPU bf16 training =="
    python3 -m mnemotorch.cli train configs/tiny_shakespeare.toml --set out_dir="$OUT/run1" --set precision=bf16 --set steps=60 \
        --set eval_interval=30 2>&1 | tail -8 | tee -a "$OUT/train.log" || STATUS=1
    if [ "$NGPU" -ge 2 ]; then
        for mode in ddp fsdp2; do
            echo "== 2-GPU $mode training =="
            torchrun --standalone --nproc_per_node=2 -m mnemotorch.cli train configs/tiny_shakespeare.toml \
                --set out_dir="$OUT/run_$mode" --set distributed=$mode --set precision=fp32 --set steps=30 --set eval_interval=30 \
                2>&1 | tail -8 | tee -a "$OUT/train.log" || STATUS=1
        done
        echo "== 1-GPU fp32 reference for the 2-GPU runs =="
        python3 -m mnemotorch.cli train configs/tiny_shakespeare.toml --set out_dir="$OUT/run_single" --set precision=fp32 --set steps=30 \
            --set eval_interval=30 2>&1 | tail -4 || STATUS=1
        python3 - "$OUT" <<'PY' | tee "$OUT/distributed_compare.json"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def losses(d):
    f = out / d / "metrics.jsonl"
    if not f.exists():
        return None
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
single = losses("run_single")
res = {}
for mode in ("ddp", "fsdp2"):
    other = losses(f"run_{mode}")
    if single and other:
        common = sorted(set(single) & set(other))
        res[mode] = {"steps_compared": len(common), "max_abs_loss_diff": max(abs(single[s] - other[s]) for s in common) if common else None}
    else:
        res[mode] = "missing metrics"
print(json.dumps(res, indent=1))
PY
    fi
    # keep only small files in $OUT (the tool returns at most 8 files, 2 folders deep)
    for d in "$OUT"/run*; do [ -d "$d" ] && rm -rf "$d"; done
fi
exit $STATUS

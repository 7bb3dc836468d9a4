#!/usr/bin/env bash
# Run on the lent GPU machine (torch/triton/transformers preinstalled there, no network):
#   1. GPU tests (CUDA model/mixer checks; SKIP_TESTS=1 skips),
#   2. real training runs: 1 GPU bf16, DDP and FSDP2 under torchrun on all GPUs (>= 2),
#      bitwise resume on the GPU, eval and generate, a hybrid sliding-window/attention model,
#   3. with BENCH=1, the kernel benchmark (mnemo bench kernels).
# Logs and a JSON summary land in $OUT (default ./gpu_out).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg MNEMO_GPU_TESTS=1
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import json, torch, transformers, triton; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'n_gpus': torch.cuda.device_count(), 'torch': torch.__version__, 'triton': triton.__version__, 'transformers': transformers.__version__}))" | tee "$OUT/env.json"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== GPU tests =="
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -6 | tee "$OUT/pytest_gpu.log"
fi
C=configs/tiny_shakespeare.toml
S="steps=60 eval_interval=30 log_interval=10 save_interval=0 resume=none batch_size=32"
T="/tmp/mnemo_gpu_runs"
rm -rf "$T"; mkdir -p "$T"
{
echo "== 1 GPU, bf16 autocast =="
python3 -m mnemotorch.cli train $C --no-progress --set $S out_dir=$T/r1 2>&1 | grep -E "model:|val loss|tokens_per_s|Error|error"
if [ "$N" -ge 2 ]; then
    echo "== $N GPUs, DDP (nccl) =="
    python3 -m torch.distributed.run --standalone --nproc_per_node=$N -m mnemotorch.cli train $C --no-progress --set $S out_dir=$T/r2 distributed=ddp grad_accum=2 2>&1 | grep -E "model:|val loss|tokens_per_s|Error|error"
    echo "== $N GPUs, FSDP2 =="
    python3 -m torch.distributed.run --standalone --nproc_per_node=$N -m mnemotorch.cli train $C --no-progress --set $S out_dir=$T/r3 distributed=fsdp2 2>&1 | grep -E "model:|val loss|tokens_per_s|Error|error"
fi
echo "== resume on the GPU =="
python3 -m mnemotorch.cli train $C --no-progress --set $S out_dir=$T/r4 stop_at_step=30 > /dev/null 2>&1
python3 -m mnemotorch.cli train $C --no-progress --set $S out_dir=$T/r4 resume=auto 2>&1 | grep -E "resumed|val loss"
echo "== hybrid sliding_window/attention (block-sparse kernel) bf16 =="
python3 -m mnemotorch.cli train configs/hybrid_swa_attention.toml --no-progress --set steps=40 eval_interval=20 out_dir=$T/r5 resume=none 2>&1 | grep -E "model:|val loss|tokens_per_s|Error|error"
python3 -m mnemotorch.cli eval $T/r1 --batches 20
python3 -m mnemotorch.cli generate $T/r1 --prompt "ROMEO:" --max-new-tokens 80
} 2>&1 | tee "$OUT/train.log"
python3 - "$T" <<'PY' | tee "$OUT/summary.json"
import json, os, sys
T = sys.argv[1]
def rows(d):
    f = f"{T}/{d}/metrics.jsonl"
    return [json.loads(l) for l in open(f)] if os.path.exists(f) else []
summary = {}
for d in ["r1", "r2", "r3", "r4", "r5"]:
    r = rows(d)
    train = [x for x in r if "loss" in x]
    ev = [x for x in r if "val_loss" in x]
    summary[d] = {"last_train_loss": train[-1]["loss"] if train else None, "val_loss": ev[-1]["val_loss"] if ev else None,
                  "tokens_per_s": [x["tokens_per_s"] for x in train][-1] if train else None}
a, b = [x for x in rows("r1") if "loss" in x], [x for x in rows("r4") if "loss" in x]
summary["bitwise_resume_gpu"] = bool(a) and len(a) == len(b) and all(x["loss"] == y["loss"] for x, y in zip(a, b))
print(json.dumps(summary, indent=1))
PY
if [ "${BENCH:-0}" = 1 ]; then
    python3 -m mnemotorch.cli bench kernels -- --out "$OUT/bench_kernels.json" ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tail -12
fi

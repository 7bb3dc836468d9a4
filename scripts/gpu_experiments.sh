#!/usr/bin/env bash
# Run on the lent GPU machine: the memory-benchmark experiments of issue 3, each under a time
# budget (the runner is resumable: pass the same --out again to continue a sweep).
#   OUT=... MQAR_ONLY="seq_len=256" bash scripts/gpu_experiments.sh
# Results (JSON, Markdown, plots) are packed into $OUT/experiments.tgz (the device returns <= 8 files).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
RES="${RES:-/tmp/mnemo_experiments}"
mkdir -p "$OUT" "$RES"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg MNEMO_AUTOTUNE=${MNEMO_AUTOTUNE:-0}
{
python3 -c "import json, torch, transformers, triton; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__, 'transformers': transformers.__version__}))"
for w in ${MQAR_WIDTHS:-64 128}; do
    echo "== MQAR ${MQAR_ONLY:-seq_len=256} width $w =="
    timeout ${MQAR_TIMEOUT:-200} python3 -m mnemotorch.cli experiment configs/mqar.yaml --out "$RES" --no-progress \
        --only "${MQAR_ONLY:-seq_len=256}" --only "d=$w|" --time-budget ${MQAR_BUDGET:-170}
done
if [ "${PASSKEY:-1}" = 1 ]; then
    echo "== passkey =="
    timeout ${PASSKEY_TIMEOUT:-200} python3 -m mnemotorch.cli experiment configs/passkey.yaml --out "$RES" --no-progress --time-budget ${PASSKEY_BUDGET:-160}
fi
} 2>&1 | tee "$OUT/experiments.log"
tar czf "$OUT/experiments.tgz" -C "$RES" .

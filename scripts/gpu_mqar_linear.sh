#!/usr/bin/env bash
# A `mnemo experiment` grid on one GPU as parallel worker processes, ending before a deadline. Written for
# MQAR accuracy vs state size of based / linear_attention / hebbian (delta) beside attention and
# sliding window (issue #6); runs any experiment config (MQAR_CONFIG: configs/mqar_memory.yaml,
# configs/passkey_titans.yaml, configs/passkey_routed.yaml, ...):
#   OUT=/path/to/out bash scripts/gpu_mqar_linear.sh                      # configs/mqar_linear.yaml
#   MQAR_CONFIG=configs/mqar_memory.yaml MQAR_SOLO=titans_lmm,moneta OUT=... bash scripts/gpu_mqar_linear.sh
# The grid of the config (mqar_linear.yaml: 5 mixers x 2 widths x 2 learning rates = 20 cells) runs as
# several `mnemo experiment` processes side by side on the one GPU: these models are tiny and
# launch-bound, and the delta rule's token loop (~0.2-0.3 s per step on any device) would alone take
# longer than the time limit if its cells ran one after another. Each cell of a mixer named in
# MQAR_SOLO gets its own process; the other mixers share MQAR_GROUPS processes (default 4: with the
# config's 4 non-solo mixers, one process each, so each runs 4 cells one after another). Every process stops
# by DEADLINE seconds after the start (`timeout`; no process starts a new cell within MQAR_CELL_GUARD
# seconds of it; a cell still training at the deadline is lost); then the per-process results are
# merged, the report and plots are regenerated (`mnemo experiment --report-only`) and, where the config
# has one (docs/results/<config stem>_summary.md, e.g. mqar_linear, mqar_memory), the summary page
# beside the anchors is filled in.
#
# $OUT gets 4 files: <name>.json (every cell: accuracy, state size, loss curve, timings),
# <name>.md (the runner's report, anchors included), <name>_state_size.png, and
# <name>_rest.tgz (<name>_summary.md = the summary page filled in, the seq-len plot, the
# per-process results and logs, a GPU utilisation trace). <name> is the config's `experiment`.
#
# Two configs side by side on one GPU: two instances of this script, in the background, each with its
# own MQAR_CONFIG / DEADLINE; their scratch folders differ by default (RES=/tmp/mnemo_<config stem>),
# and one OUT serves both (the file names differ).
#
# Resuming: cells already in $MQAR_RESUME (default docs/results/<name>.json when it exists;
# MQAR_RESUME=none to start afresh) are not run again, so a second run completes a cut-short grid.
# CPU check of the whole pipeline at toy sizes: MQAR_QUICK=1 OUT=/tmp/q bash scripts/gpu_mqar_linear.sh
# Refill the summary page from a results file (none: the empty skeleton):
#   bash scripts/gpu_mqar_linear.sh --fill RESULTS.json [PAGE]     (PAGE: default the skeleton itself)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
CONFIG="${MQAR_CONFIG:-configs/mqar_linear.yaml}"
STEM="$(basename "$CONFIG")"; STEM="${STEM%.*}"
# The summary page filled beside the anchors: docs/results/<config stem>_summary.md where it exists
# (mqar_linear, mqar_memory); other configs (passkey_*) have the runner's report only.
SKELETON="${MQAR_SKELETON:-docs/results/${STEM}_summary.md}"
OUT="${OUT:-$ROOT/gpu_out}"
RES="${RES:-/tmp/mnemo_$STEM}"     # per config: two configs can run side by side (two instances of this script)
DEADLINE="${DEADLINE:-520}"       # seconds after START by which every worker has ended (merge, report, tar: ~15 s more)
CELL_GUARD="${MQAR_CELL_GUARD:-45}"
SOLO="${MQAR_SOLO:-hebbian_delta}"
NGROUPS="${MQAR_GROUPS:-4}"
QUICK="${MQAR_QUICK:-0}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export MNEMO_AUTOTUNE="${MNEMO_AUTOTUNE:-0}"   # fixed Triton launch parameters: no tuning time per process
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"  # several processes share the host's cores
QFLAG=()
[ "$QUICK" = 1 ] && QFLAG=(--quick)
mkdir -p "$RES"

# The summary filler: the table between the markers of $SKELETON, from the config and a results file.
cat > "$RES/fill_summary.py" <<'PY'
"""Fill the summary page: our best accuracy and state size per (mixer, width) beside the anchors.

The grid comes from the results file's resolved config (what ran) or, for the empty skeleton, from
the config file. Needs no torch, so refilling takes a moment."""
import json, re, sys, time
from pathlib import Path
import yaml

config, quick, skeleton, out = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3]), Path(sys.argv[4])
results = json.loads(Path(sys.argv[5]).read_text()) if len(sys.argv) > 5 and Path(sys.argv[5]).is_file() else None
if results is not None:
    cfg = results["config"]
else:
    cfg = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    for key, value in (cfg.pop("quick", None) or {}).items() if quick else ():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "mixers" else value
    cfg["learning_rates"] = [float(x) for x in cfg["learning_rates"]]
best = {(e["mixer"], e["width"]): e for e in (results or {}).get("best", [])}

def label(setting):   # as mnemotorch.bench.experiment._setting_label
    if "label" in setting:
        return str(setting["label"])
    return ",".join(f"{k}={v}" for k, v in setting.items() if k not in ("steps", "batch_size", "eval_batch_size", "label", "eval")) or "default"

def excluded(setting, mixer, width, lr):   # as mnemotorch.bench.experiment._excluded (the config's holes)
    def has(entry, key, value, same=lambda a, b: a == b):
        vals = entry.get(key)
        if vals is None:
            return True
        return any(same(value, v) for v in (vals if isinstance(vals, list) else [vals]))
    return any(has(e, "mixer", mixer) and has(e, "width", width) and has(e, "lr", lr, lambda a, b: abs(a - float(b)) <= 1e-9 * abs(a))
               and has(e, "setting", label(setting), lambda a, b: a == str(b)) for e in cfg.get("exclude") or [])

planned = [(s, m, w, lr) for s in cfg["settings"] for m in cfg["mixers"] for w in cfg["widths"] for lr in cfg["learning_rates"]
           if not excluded(s, m, w, lr)]

def fmt_int(x):   # as mnemotorch.bench.report writes state sizes
    x = int(x)
    return f"{x / 1e6:.2f}M" if x >= 10**6 else f"{x / 1e3:.1f}k" if x >= 10**4 else str(x)

def anchor_text(mixer):
    parts = []
    for a in cfg.get("anchors") or []:
        if a.get("ours") != mixer:
            continue
        sizes, accs = str(a.get("state size", "")).split(" / "), str(a.get("accuracy", "")).split(" / ")
        pts = (", ".join(f"{x} @ {s}" for x, s in zip(accs, sizes)) if len(sizes) == len(accs) > 1
               else f"{accs[0]} ({sizes[0]})" if sizes[0] else accs[0])
        parts.append(f"{a.get('mixer')}: {pts} — {a.get('source', '')}")
    return "; ".join(parts) or "no anchor in the spec"

lrs = [f"{lr:.3g}" for lr in cfg["learning_rates"]]
# Extra test sets (e.g. passkey at 4x / 16x the training length): one column each, by label as the runner names them.
evals = list(dict.fromkeys(str(e["label"]) if "label" in e else
                           ",".join(f"{k}={v}" for k, v in e.items() if k not in ("label", "eval_batch_size", "num_test")) or "default"
                           for s in cfg["settings"] for e in s.get("eval", [])))
rows = ["| mixer | width | state size (ours) | accuracy (best lr) | best lr | " + " | ".join(f"lr {x}" for x in lrs)
        + "".join(f" | test {x}" for x in evals) + " | params | published anchor: accuracy @ state size |",
        "|" + " --- |" * (7 + len(lrs) + len(evals))]
for mixer in cfg["mixers"]:
    for width in cfg["widths"]:
        if not any(m == mixer and w == width for _, m, w, _ in planned):
            continue   # every cell of this row is left out of the grid (exclude)
        e = best.get((mixer, width))
        if e is None:
            ours = ["pending"] * (3 + len(lrs) + len(evals)) + ["–"]
        elif e.get("status") != "ok":
            ours = ["–", "failed", "–"] + ["failed"] * len(lrs) + ["–"] * (len(evals) + 1)
        else:
            by = e.get("accuracy_by_lr", {})
            ev = {str(x.get("label")): x for x in e.get("evals") or []}
            ours = [fmt_int(e["state_size"]) if e.get("state_size") else "–", f"**{e['accuracy']:.3f}**", f"{e['best_lr']:.3g}"] + [
                "–" if by.get(x) is None else f"{by[x]:.3f}" for x in lrs] + [
                "–" if ev.get(x, {}).get("accuracy") is None else f"{ev[x]['accuracy']:.3f}" for x in evals] + [
                fmt_int(e["params"]) if e.get("params") else "–"]
        rows.append("| " + " | ".join([mixer, str(width)] + ours + [anchor_text(mixer)]) + " |")

if results is None:
    run = ["Not run yet: `bash scripts/gpu_mqar_linear.sh` fills this table from the run's JSON."]
else:
    cells = results.get("cells", {})
    ok = sum(c.get("status") == "ok" for c in cells.values())
    failed = sum(c.get("status") == "failed" for c in cells.values())
    total = len(planned)
    env = results.get("environment", {})
    run = [
        f"Device: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}"
        + (f", triton {env['triton']}" if env.get("triton") else "") + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; git {results.get('git_revision', '?')}; {results.get('finished_at', time.strftime('%Y-%m-%d'))}.",
        f"Cells: {ok} ok, {failed} failed, {total - ok - failed} not run (of {total})"
        + (f"; wall time {results['wall_seconds']:.0f} s" if results.get("wall_seconds") else "") + ".",
    ]
    secs = {}
    for c in cells.values():
        if c.get("status") == "ok" and c.get("steps"):
            secs.setdefault(c["mixer"], []).append(1000 * c["train_seconds"] / c["steps"])
    if secs:
        run.append("Training time per step (ms, mean over the mixer's cells, other processes sharing the machine): "
                   + ", ".join(f"{m} {sum(v) / len(v):.0f}" for m, v in secs.items()) + ".")

text = skeleton.read_text(encoding="utf-8")
for tag, body in (("table", rows), ("run", run)):
    pat = re.compile(rf"(<!-- [\w-]+:{tag}:begin -->\n).*?(<!-- [\w-]+:{tag}:end -->)", re.S)
    if not pat.search(text):
        sys.exit(f"{skeleton}: no <name>:{tag}:begin / end markers")
    text = pat.sub(lambda m: m.group(1) + "\n".join(body) + "\n" + m.group(2), text)
out.write_text(text, encoding="utf-8")
print("\n".join(rows + [""] + run))
PY

if [ "${1:-}" = "--fill" ]; then   # refill the page from a results file, nothing else
    python3 "$RES/fill_summary.py" "$CONFIG" "$QUICK" "$SKELETON" "${3:-$SKELETON}" "${2:?usage: --fill RESULTS.json [PAGE]}"
    exit $?
fi

RESUME="${MQAR_RESUME:-}"
rm -rf "$RES/workers" "$RES/final" "$RES/logs"
mkdir -p "$OUT" "$RES/workers" "$RES/final" "$RES/logs"
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$RES/logs/main.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# The plan: "<worker>\t<--only filter>" lines in run order, into plan.tsv; prints the experiment name.
NAME=$(python3 - "$CONFIG" "$QUICK" "$SOLO" "$NGROUPS" "$RES/plan.tsv" <<'PY'
import json, platform, sys
import torch
from mnemotorch.bench import load_experiment_config, plan_cells
cfg = load_experiment_config(sys.argv[1], quick=sys.argv[2] == "1")
solo, ngroups = set(sys.argv[3].split(",")) - {""}, max(1, int(sys.argv[4]))
cells = plan_cells(cfg)
shared = [m for m in cfg["mixers"] if m not in solo]
with open(sys.argv[5], "w") as f:
    for i, m in enumerate(shared):                  # round-robin: one `--only |mixer|` run each
        f.write(f"g{i % ngroups}\t|{m}|\n")
    for j, c in enumerate(c for c in cells if c.mixer in solo):   # one process per cell (its full id)
        f.write(f"s{j}\t{c.id}\n")
print(json.dumps({"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "python": platform.python_version()}), file=sys.stderr)
print(cfg["experiment"])
PY
) || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader | tee -a "$RES/logs/main.log"
RESUME="${RESUME:-docs/results/$NAME.json}"
WORKERS=$(cut -f1 "$RES/plan.tsv" | awk '!seen[$0]++')
log "config $CONFIG ($NAME), $(wc -l < "$RES/plan.tsv") runs on $(echo $WORKERS | wc -w) workers; deadline ${DEADLINE}s"
[ -f "$RESUME" ] && log "resuming from $RESUME" || RESUME=""

PIDS=()
for w in $WORKERS; do
    mkdir -p "$RES/workers/$w"
    [ -n "$RESUME" ] && cp "$RESUME" "$RES/workers/$w/$NAME.json"
    (
        awk -F'\t' -v w="$w" '$1 == w { sub(/^[^\t]*\t/, ""); print }' "$RES/plan.tsv" | while IFS= read -r filt; do
            rem=$(left)
            if [ "$rem" -le "$CELL_GUARD" ]; then echo "skip $filt: ${rem}s left"; continue; fi
            echo "== $filt (${rem}s left) =="
            timeout -k 5 "$rem" python3 -m mnemotorch.cli experiment "$CONFIG" ${QFLAG[@]+"${QFLAG[@]}"} --out "$RES/workers/$w" \
                --no-progress --only "$filt" --time-budget $(( rem - CELL_GUARD )) < /dev/null > "$RES/logs/$w.stdout"
            rc=$?
            tail -n 2 "$RES/logs/$w.stdout"
            echo "rc=$rc after $(( $(date +%s) - START ))s"
        done
    ) > "$RES/logs/$w.log" 2>&1 &
    PIDS+=($!)
done

# Wait, with a progress line (cells done, GPU utilisation and memory) every 30 s.
while :; do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    [ "$alive" = 0 ] && break
    sleep 5
    el=$(( $(date +%s) - START ))
    if [ $(( el % 30 )) -lt 5 ]; then
        done_cells=$(cat "$RES"/workers/*/"$NAME".json 2>/dev/null | grep -c '"finished_at"')
        gpu=$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | head -1)
        log "$alive workers running, $done_cells cell records, GPU ${gpu:-n/a}"
        [ -n "$gpu" ] && echo "$el, $gpu" >> "$RES/logs/gpu_trace.csv"
    fi
done
wait
log "workers done"

# Merge the per-worker results (each holds its own cells), regenerate the report and plots from
# them (the runner's report-only mode), and record what the runner does not: command, git revision,
# library and driver versions, wall time. One process, so that it all takes a few seconds.
timeout 30 python3 - "$CONFIG" "$QUICK" "$RES" "$NAME" "$RESUME" "$START" > "$RES/logs/report.log" 2>&1 <<'PY' || log "merge/report failed (see report.log)"
import glob, json, subprocess, sys, time
from mnemotorch.bench import load_experiment_config, plan_cells, run_experiment
config, quick, res, name, resume, start = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
# Records of another version of the config (same cell id, other fingerprint: e.g. the layer plans
# or the step count changed) are dropped, so the merged file and the page's cell counts describe
# this config only; they stay in git history.
current = {c.id: c.fingerprint for c in plan_cells(load_experiment_config(config, quick=quick))}
ours = sorted(glob.glob(f"{res}/workers/*/{name}.json"))
cells, env = {}, None
for p in ([resume] if resume else []) + ours:          # this run's records last: they win
    try:
        d = json.load(open(p))
    except (OSError, json.JSONDecodeError) as err:
        print(f"skipped {p}: {err}")
        continue
    cells.update(d.get("cells", {}))
    if p != resume or env is None:
        env = d.get("environment") or env
stale = sorted(k for k, c in cells.items() if current.get(k) != c.get("fingerprint"))
cells = {k: c for k, c in cells.items() if k not in stale}
path = f"{res}/final/{name}.json"
json.dump({"experiment": name, "cells": cells, "environment": env or {}}, open(path, "w"), indent=1)
print(f"merged {len(cells)} cell records from {len(ours)} worker file(s)" + (f" and {resume}" if resume else "")
      + (f"; dropped {len(stale)} of another config version" if stale else ""))
run_experiment(config, quick=quick, out_dir=f"{res}/final", report_only=True, progress=False)
d = json.load(open(path))
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
d["command"] = "bash scripts/gpu_mqar_linear.sh (parallel `mnemo experiment --only` workers, merged, then report-only)"
d["git_revision"] = sh("git rev-parse --short HEAD") + (" (dirty)" if sh("git status --porcelain -- src configs scripts") else "")
d["wall_seconds"] = round(time.time() - start, 1)
d["finished_at"] = time.strftime("%Y-%m-%d %H:%M")
e = d.setdefault("environment", {})
for mod in ("triton", "transformers"):
    try:
        e[mod] = __import__(mod).__version__
    except Exception:
        pass
drv = sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1")
if drv:
    e["driver"] = drv
json.dump(d, open(path, "w"), indent=1)
print(f"{path}: complete={d.get('complete')}, {len(d.get('best', []))} groups")
PY
if [ -f "$SKELETON" ]; then
    python3 "$RES/fill_summary.py" "$CONFIG" "$QUICK" "$SKELETON" "$RES/final/${NAME}_summary.md" "$RES/final/$NAME.json" \
        > "$RES/logs/summary.log" 2>&1 || log "summary fill failed (see summary.log)"
else
    echo "no summary page $SKELETON for this config: the runner's report $NAME.md is the results page" > "$RES/logs/summary.log"
fi

# $OUT: the JSON, the runner's Markdown and state-size plot; everything else in one archive.
for f in "$NAME.json" "$NAME.md" "${NAME}_state_size.png"; do
    [ -f "$RES/final/$f" ] && cp "$RES/final/$f" "$OUT/"
done
tar czf "$OUT/${NAME}_rest.tgz" -C "$RES" --exclude="workers/*/*.png" --exclude="workers/*/*.md" --exclude="final/$NAME.json" --exclude="final/$NAME.md" \
    --exclude="final/${NAME}_state_size.png" final workers logs plan.tsv
log "wrote $(ls "$OUT" | tr '\n' ' ')"
echo
cat "$RES/final/$NAME.md" 2>/dev/null
echo
echo "== summary beside the anchors (${NAME}_summary.md, in ${NAME}_rest.tgz) =="
cat "$RES/logs/summary.log"
for w in $WORKERS; do echo "-- $w: $(grep -c '^rc=' "$RES/logs/$w.log") run(s), $(grep '^rc=' "$RES/logs/$w.log" | tr '\n' ' ')"; done
log "end"

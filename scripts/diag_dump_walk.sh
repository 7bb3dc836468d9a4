#!/bin/bash
# Diagnostics (twentieth session): one split-walk variant under compute-sanitizer (memcheck), then the device's
# compiled Titans walk kernels (ttgir, ptx, sass) packed into $OUT/walk.tgz. ONE picks the variant in
# scripts/diag_walk_split.py's --one form, slice:mode:config:t:phase3:carry:exact_keys, e.g.
#   ONE=32:one_launch:matched:512:recompute:0:1 bash scripts/diag_dump_walk.sh
source scripts/gpu_env.sh >/dev/null
mkdir -p "$OUT/walk"
timeout 200 compute-sanitizer --tool memcheck --print-limit 1 --show-backtrace no python3 scripts/diag_walk_split.py --one ${ONE:-64:one_launch:matched:512:recompute:0:1} 2>&1 | grep -v "Host Frame" | tail -12
python3 - <<'PY'
import glob, json, os, shutil, subprocess
out = os.path.join(os.environ["OUT"], "walk")
for meta in glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "*.json")):
    try:
        m = json.load(open(meta))
    except Exception:
        continue
    if m.get("name") != "_lmm_split_fwd_kernel":
        continue
    d = os.path.dirname(meta); h = os.path.basename(d)[:10]
    print(h, "shared", m.get("shared"), "warps", m.get("num_warps"))
    for f in os.listdir(d):
        if f.endswith((".ttgir", ".ptx")):
            shutil.copy(os.path.join(d, f), os.path.join(out, h + os.path.splitext(f)[1]))
        if f.endswith(".cubin"):
            with open(os.path.join(out, h + ".sass"), "w") as fh:
                subprocess.run(["cuobjdump", "--dump-sass", os.path.join(d, f)], stdout=fh)
PY
ls "$OUT/walk" | wc -l; tar czf "$OUT/walk.tgz" -C "$OUT" walk && rm -rf "$OUT/walk"; ls -la "$OUT"

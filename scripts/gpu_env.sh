# Source this on the lent GPU machine (repo root) before GPU work:  source scripts/gpu_env.sh
# - installs the carried peer wheels (.peers/routing, .whl; one copy of each) into /tmp/site and puts
#   src/ and them on PYTHONPATH;
# - restores the Triton / inductor compile caches carried in .gpucache/compile_cache.tgz, so kernels
#   compiled in an earlier call (same source, same Triton) are not compiled again: on a fresh machine
#   compilation was most of a GPU test file's time;
# - defines save_compile_cache: packs the caches into $OUT/compile_cache.tgz (when under 15 MB) for the
#   next call. Back here, copy it from the call's files_at folder to .gpucache/compile_cache.tgz and
#   name .gpucache in the next call's carry (the folder is git-ignored).
ROOT="${ROOT:-$(pwd)}"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
SITE=""
wheels=$(ls "$ROOT"/.peers/routing/*.whl "$ROOT"/.whl/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')   # a wheel in both folders once
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels && SITE=/tmp/site
fi
export PYTHONPATH="$ROOT/src${SITE:+:$SITE}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export MNEMO_COMPILE_CACHE=/tmp/mnemo_compile_cache
export TRITON_CACHE_DIR="$MNEMO_COMPILE_CACHE/triton" TORCHINDUCTOR_CACHE_DIR="$MNEMO_COMPILE_CACHE/inductor"
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if [ -f "$ROOT/.gpucache/compile_cache.tgz" ]; then
    tar xzf "$ROOT/.gpucache/compile_cache.tgz" -C "$MNEMO_COMPILE_CACHE" && echo "compile cache restored: $(du -sh "$MNEMO_COMPILE_CACHE" | cut -f1)"
fi

save_compile_cache() {
    local tgz="$OUT/compile_cache.tgz"
    tar czf "$tgz" -C "$MNEMO_COMPILE_CACHE" . 2>/dev/null
    local size=$(stat -c %s "$tgz" 2>/dev/null || echo 0)
    if [ "$size" -gt 15000000 ]; then
        # keep the Triton kernels only (the larger inductor cache is cheaper to rebuild)
        tar czf "$tgz" -C "$MNEMO_COMPILE_CACHE" triton 2>/dev/null
        size=$(stat -c %s "$tgz")
    fi
    [ "$size" -gt 15000000 ] && { rm -f "$tgz"; echo "compile cache too large to bring back"; return 0; }
    echo "compile cache saved: $tgz ($size bytes)"
}

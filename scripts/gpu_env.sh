# Source this on the lent GPU machine (repo root) before GPU work:  source scripts/gpu_env.sh
# - installs the carried peer wheels (.peers/routing, .whl; one copy of each) into /tmp/site and puts
#   src/ and them on PYTHONPATH;
# - restores the Triton / inductor compile caches carried in .gpucache/compile_cache.tgz, so kernels
#   compiled in an earlier call (same source, same Triton) are not compiled again: on a fresh machine
#   compilation was most of a GPU test file's time;
# - defines save_compile_cache: packs the caches into $OUT/compile_cache.tgz.NN (15 MB parts) for the
#   next call. Back here, copy them from the call's files_at folder into .gpucache/ and
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
parts=$(ls "$ROOT"/.gpucache/compile_cache.tgz* 2>/dev/null | sort)
if [ -n "$parts" ]; then
    cat $parts | tar xzf - -C "$MNEMO_COMPILE_CACHE" && echo "compile cache restored: $(du -sh "$MNEMO_COMPILE_CACHE" | cut -f1)"
fi

save_compile_cache() {
    # At most 8 files of 16 MiB come back from a call: the archive travels in 15 MB parts (3 at most;
    # Triton kernels only when the whole cache needs more). Back here:
    #   rm -f .gpucache/compile_cache.tgz*; cp FILES_AT/compile_cache.tgz.* .gpucache/
    # Still too large: the newest Triton kernels (by their compile time, which the archive keeps) that fit
    # COMPILE_CACHE_KEEP_KB uncompressed (~7:1 in the archive); older ones are compiled again when needed.
    local tgz=/tmp/compile_cache.tgz
    tar czf "$tgz" -C "$MNEMO_COMPILE_CACHE" . 2>/dev/null
    if [ "$(stat -c %s "$tgz")" -gt 45000000 ]; then
        tar czf "$tgz" -C "$MNEMO_COMPILE_CACHE" triton 2>/dev/null
    fi
    if [ "$(stat -c %s "$tgz")" -gt 45000000 ]; then
        (cd "$MNEMO_COMPILE_CACHE" && find triton -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2- \
            | while read -r d; do echo "$(du -sk "$d" | cut -f1) $d"; done \
            | awk -v keep="${COMPILE_CACHE_KEEP_KB:-260000}" '{ total += $1; if (total <= keep) print $2 }' > /tmp/compile_cache_keep.txt
         tar czf "$tgz" -T /tmp/compile_cache_keep.txt 2>/dev/null)
        echo "compile cache: the newest $(wc -l < /tmp/compile_cache_keep.txt) Triton kernels kept"
    fi
    local size=$(stat -c %s "$tgz")
    [ "$size" -gt 45000000 ] && { echo "compile cache too large to bring back ($size bytes)"; return 0; }
    rm -f "$OUT"/compile_cache.tgz.*
    split -b 15000000 -d -a 2 "$tgz" "$OUT/compile_cache.tgz."
    echo "compile cache saved: $size bytes in $(ls "$OUT"/compile_cache.tgz.* | wc -l) part(s)"
}

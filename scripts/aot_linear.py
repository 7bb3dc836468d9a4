"""Compile the one-pass linear-attention forward (``_la_fwd_fused``) for sm_90a without a GPU and
report, per launch configuration, what decides whether it runs and pipelines on an H100:
shared memory (the H100 allows 227 KB a block), registers and spill bytes (ptxas), the number of
async copies (0: the loads of the next chunk are not pipelined) and whether ptxas serialises the
wgmma instructions (its warning C7515).

    PYTHONPATH=src python scripts/aot_linear.py                       # the fixed launches and the sweep's candidates
    PYTHONPATH=src python scripts/aot_linear.py --dtype bfloat16 --feature elu_plus_one --normalize --chunk 128

Pointer and integer arguments are compiled with the divisibility-by-16 hints the JIT gives them
at the benchmark shape (without them the loads are not vectorised and nothing is pipelined).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.backends.nvidia as nv  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory a block may use on an H100 (sm_90)
TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _ptxas() -> str:
    if os.environ.get("TRITON_PTXAS_PATH"):  # (a chosen one, as Triton takes it)
        return os.environ["TRITON_PTXAS_PATH"]
    d = os.path.join(os.path.dirname(nv.__file__), "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # Triton 3.6+ ships a newer ptxas under the first name
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise FileNotFoundError(f"no ptxas in {d}")


def compile_sm90(kernel, sig: dict, constexprs: dict, attrs: dict, warps: int, stages: int):
    """``kernel`` compiled for sm_90a and assembled by ptxas: ``(compiled kernel, ptxas -v output, registers,
    spill-store bytes, ptxas return code)`` (registers / spills None where ptxas printed none)."""
    k = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    txt = out.stderr + out.stdout
    regs = re.findall(r"Used (\d+) registers", txt)
    spill = re.findall(r"(\d+) bytes spill stores", txt)
    return k, txt, int(regs[0]) if regs else None, int(spill[0]) if spill else None, out.returncode


def compile_fused(dtype: str, feature: int, normalize: bool, chunk: int, dk: int, bv: int, warps: int, stages: int) -> dict:
    import mnemotorch.ops.linear.triton as K

    t = TYPES[dtype]
    ptr = f"*{t}"
    sig = dict(Q=ptr, K=ptr, V=ptr, S0="*fp32", Z0="*fp32", Y=ptr, DEN="*fp32", ST="*fp32", ZT="*fp32",
               T="i32", NT="i32", H="i32", Dk="i32", Dv="i32", eps="fp32",
               C="constexpr", BDK="constexpr", BV="constexpr", FEATURE="constexpr", NORMALIZE="constexpr",
               STATE_HALF="constexpr", HAS_S0="constexpr", STORE_FINAL="constexpr", IEEE="constexpr")
    cx = dict(C=chunk, BDK=K._bdk(dk), BV=bv, FEATURE=feature, NORMALIZE=normalize, STATE_HALF=t == "bf16",
              HAS_S0=False, STORE_FINAL=True, IEEE=t == "fp32")
    names = list(sig)
    div = ["Q", "K", "V", "S0", "Z0", "Y", "DEN", "ST", "ZT", "T", "NT", "H", "Dk", "Dv"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    k, txt, regs, spill, rc = compile_sm90(K._la_fwd_fused, sig, cx, attrs, warps, stages)
    return dict(shared_kb=round(k.metadata.shared / 1024, 1), fits=k.metadata.shared <= SMEM_LIMIT, regs=regs, spill_bytes=spill,
                async_copies=len(re.findall(r"async_copy_global_to_local|async_tma_copy", k.asm["ttgir"])),
                wgmma_serialized="C7515" in txt, ptxas_rc=rc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(TYPES))
    ap.add_argument("--feature", default="identity", choices=["identity", "elu_plus_one", "relu"])
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--configs", default="", help="BV:warps:stages,... (default: the fixed launch and diag_linear.py's sweep candidates)")
    args = ap.parse_args()
    import mnemotorch.ops.linear.triton as K

    fid = K.FEATURE_IDS[args.feature]
    meta = dict(FEATURE=fid, NORMALIZE=args.normalize)
    fixed = K._fixed("_la_fwd_fused", args.dk, args.dv, args.dtype == "float32", args.chunk, meta)
    cfgs = [("fixed", fixed["BV"], fixed["num_warps"], fixed["num_stages"])]
    if args.configs:
        cfgs += [("", *map(int, c.split(":"))) for c in args.configs.split(",") if c]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from diag_linear import SWEEP_CONFIGS

        cfgs += [("sweep", c["BV"], c["num_warps"], c["num_stages"]) for c in SWEEP_CONFIGS["_la_fwd_fused"]]
    print(f"triton {triton.__version__}, _la_fwd_fused {args.dtype} {args.feature} normalize={args.normalize} C={args.chunk} Dk={args.dk}")
    for tag, bv, w, st in cfgs:
        try:
            r = compile_fused(args.dtype, fid, args.normalize, args.chunk, args.dk, bv, w, st)
        except Exception as e:  # noqa: BLE001
            r = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        print(f"  {tag:5s} BV={bv:<3d} warps={w} stages={st}: {r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline sm_90a builds of the fused Titans-memory kernels: registers, spills, shared memory, ``wgmma`` count.

No GPU needed: Triton compiles each kernel for an H100 (``GPUTarget("cuda", 90, 32)``) and its bundled ptxas reports
registers and spill bytes. Shapes are the benchmark's (d 64, hidden 256, chunk 64; bf16 inputs, fp32 state), the
constexprs those the layer launches with (matched config: GELU, residual, LayerNorm, no clip). The numbers come from
the CPU machine's Triton, which may differ from the device's (Triton 3.9 here, 3.6 on the device: the read VJP's pass B
reports 20 spill bytes here and 98 spill slots there, docs/results/neural_memory.md, eighteenth session), so read them
as a comparison between variants, not as the device's.

    PYTHONPATH=src python scripts/aot_memory.py                      # every kernel at its default launch
    PYTHONPATH=src python scripts/aot_memory.py --kernels read_b --launches 64:4,32:4,64:8

``--launches`` takes ``slice:warps`` pairs (the hidden columns a program or loop step takes, and its warps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(__file__))
from aot_linear import compile_sm90  # noqa: E402

from mnemotorch.ops.memory import fused_coefficients, fused_read_vjp, fused_triton, fused_update_vjp  # noqa: E402

C, D, HID = 64, 64, 256


def build(kernel, sig: dict, constexprs: dict, warps: int, stages: int = 1) -> dict:
    """Compile ``kernel`` for sm_90a with ``sig`` (non-constexpr arguments, in order) and ``constexprs``; pointers
    get the divisibility-by-16 hint the JIT gives them. Returns shared memory, registers, spill bytes, wgmma count."""
    sig, constexprs = dict(sig), dict(constexprs)
    for p in kernel.params:  # constexprs left out take their defaults
        if p.is_constexpr and p.name not in constexprs:
            constexprs[p.name] = p.default
    sig.update({name: "constexpr" for name in constexprs})
    order = [p.name for p in kernel.params]
    sig = {name: sig[name] for name in order}
    attrs = {(order.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    k, _txt, regs, spill, rc = compile_sm90(kernel, sig, constexprs, attrs, warps, stages)
    return {"shared_kb": round(k.metadata.shared / 1024, 1), "regs": regs, "spill_bytes": spill,
            "wgmma": k.asm["ptx"].count("wgmma.mma_async"), "ptxas_rc": rc}


def _sig(kernel, kinds: dict, default: str = "*fp32") -> dict:
    """The non-constexpr arguments of ``kernel`` typed by ``kinds`` (name -> type), the rest ``default``."""
    return {p.name: kinds.get(p.name, default) for p in kernel.params if not p.is_constexpr}


def read_a(slice_: int, warps: int) -> dict:
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, ACT=1, LN=True, PREC="tf32")
    return build(fused_read_vjp._lmm_read_vjp_a_kernel, _sig(fused_read_vjp._lmm_read_vjp_a_kernel, {"ln_eps": "fp32"}), cx, warps)


def read_a_sums(slice_: int, warps: int) -> dict:
    """Pass A with the forward's kept sums (``SUMS``: no loop over the hidden slices)."""
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, ACT=1, LN=True, PREC="tf32", SUMS=True)
    return build(fused_read_vjp._lmm_read_vjp_a_kernel, _sig(fused_read_vjp._lmm_read_vjp_a_kernel, {"ln_eps": "fp32"}), cx, warps)


def chunk_read(slice_: int, warps: int, save: bool = False) -> dict:
    """The forward's batched read (``save``: keeping layer 2's three sums and ``Ẑ_1`` for the read's VJP)."""
    kern = fused_triton._lmm_chunk_read_kernel
    ints = ("sqb", "sqt", "sqh", "skb", "skt", "skh", "syb", "syt", "syh", "SLOT1", "SLOT2", "chunk0", "slot0", "H")
    kinds = {n: "i32" for n in ints}
    kinds.update({n: "*bf16" for n in ("Q", "K", "Y")}, ln_eps="fp32")
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, ACT=1, RESIDUAL=True, LN=True, CLIP=False, PREC_R="tf32", SAVE=save, SAVE_Z=save)
    return build(kern, _sig(kern, kinds), cx, warps)


def read_b(slice_: int, warps: int, zh: bool = False) -> dict:
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, ACT=1, PREC="tf32", ZH=zh)
    return build(fused_read_vjp._lmm_read_vjp_b_kernel, _sig(fused_read_vjp._lmm_read_vjp_b_kernel, {}), cx, warps)


def walk(slice_: int, warps: int) -> dict:
    kern = fused_triton._lmm_split_fwd_kernel
    ints = ("sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh", "syb", "syt", "syh", "SLOT1", "SLOT2", "slot0",
            "zrow0", "ZS", "chunk0", "n_chunks", "H")
    kinds = {n: "i32" for n in ints}
    kinds.update({n: "*bf16" for n in ("Q", "K", "V", "Y")}, CNT="*i32", PROF="*i64", ln_eps="fp32", max_norm="fp32")
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, NS=HID // slice_, ACT=1, RESIDUAL=True, LN=True, CLIP=False, PREC="bf16x3",
              PREC_R="tf32", PHASE=0, READ=False, PROFILE=False, CARRY=False, P3=2, KB=True, PTXAS="")
    return build(kern, _sig(kern, kinds), cx, warps)


def sweep(slice_: int, warps: int, save_u: bool = False) -> dict:
    kern = fused_triton._lmm_split_sweep_kernel
    kinds = {n: "i32" for n in ("chunk0", "n_chunks", "n_total")}
    kinds.update(K="*bf16", CNT="*i32", PROF="*i64")
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, NS=HID // slice_, LN=True, CLIP=False, PREC="bf16x3", PHASE=0, PROFILE=False,
              KEEP=True, FOLD=True, KB=True, JOIN=fused_triton.LAUNCH["sweep_form"] != "three_phase",
              PRE=bool(fused_triton.LAUNCH["sweep_pre_adjoint"]), SAVE_U=save_u)
    return build(kern, _sig(kern, kinds), cx, warps)


def update(slice_: int, warps: int, has_u: bool = False) -> dict:
    kern = fused_update_vjp._lmm_update_vjp_kernel
    cx = dict(C=C, DK=D, DV=D, HID=HID, BH=slice_, LN=True, RES=True, CLIP=False, COT=True, PREC="tf32", HAS_U=has_u, HAS_G=False)
    return build(kern, _sig(kern, {"tau2": "fp32"}), cx, warps, stages=2)


def coef(slice_: int, warps: int, backward: bool = False) -> dict:
    """The gate coefficients' kernels (``fused_coefficients``; ``slice_`` unused: one chunk a program)."""
    kern = fused_coefficients._coef_bwd_kernel if backward else fused_coefficients._coef_fwd_kernel
    names = {p.name for p in kern.params}
    return build(kern, _sig(kern, {n: "i32" for n in ("B", "H", "sab", "sat", "sah", "seb", "set_", "seh", "stb", "stt", "sth") if n in names}), dict(C=C, PREC=fused_coefficients.PRECISION), warps)


#: name -> (builder, default slice:warps)
KERNELS = {"read_a": (read_a, "32:4"), "read_a_sums": (read_a_sums, "32:4"), "chunk_read": (chunk_read, "32:4"),
           "chunk_read_save": (lambda s, w: chunk_read(s, w, True), "32:4"), "read_b": (read_b, "64:4"), "read_b_z": (lambda s, w: read_b(s, w, True), "64:4"), "update": (update, "32:4"),
           "update_u": (lambda s, w: update(s, w, True), "32:4"), "walk": (walk, "64:4"), "sweep": (sweep, "32:4"),
           "sweep_u": (lambda s, w: sweep(s, w, True), "32:4"), "coef_fwd": (coef, "64:4"), "coef_bwd": (lambda s, w: coef(s, w, True), "64:4")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {sorted(KERNELS)}")
    ap.add_argument("--launches", default="", help="slice:warps,... (default: each kernel's own launch)")
    args = ap.parse_args()
    for name in args.kernels.split(","):
        if name not in KERNELS:
            ap.error(f"unknown kernel {name!r}; known: {sorted(KERNELS)}")
        fn, default = KERNELS[name]
        for spec in (args.launches or default).split(","):
            slice_, warps = (int(x) for x in spec.split(":"))
            print(json.dumps({"kernel": name, "slice": slice_, "warps": warps, **fn(slice_, warps)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

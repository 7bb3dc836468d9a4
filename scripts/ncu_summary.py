"""Summaries of the Nsight Compute exports that ``scripts/gpu_na_check.sh``'s ``ncu`` step brings back (no GPU needed).

``--raw FILE`` (``ncu --page raw --csv``, plain or gzipped): per kernel name, the launches, summed duration, DRAM
bytes read and written, the L1's global and local (spill) load bytes, the peak L2 throughput and the warp stall
reasons per issued instruction (the average over launches), as a table and, with ``--json``, as JSON.
``--sass FILE`` (``ncu --page source --csv --print-source sass``): per kernel in the file, the warp-state samples by
stall reason and by opcode, and the ``--top`` instructions holding most samples::

    python scripts/ncu_summary.py --raw docs/results/ncu/ncu_2026-11-27-s21_h100_titans_raw.csv.gz
    python scripts/ncu_summary.py --sass docs/results/ncu/ncu_2026-11-27-s21_h100_na1d_sass.csv.gz --top 12
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import sys

_UNIT_BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}
_UNIT_MS = {"nsecond": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3}


def _lines(path: str) -> list[list[str]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.reader(f))


def _num(text: str) -> float:
    return float(text.replace(",", "")) if text not in ("", "n/a") else 0.0


def raw_summary(path: str) -> dict:
    """Per kernel name: the sums and averages of the raw page (units converted to ms and GB)."""
    rows = _lines(path)
    hdr, units, vals = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}

    def value(r, name, scale=None):
        i = col.get(name)
        if i is None:
            return 0.0
        v = _num(r[i])
        if scale == "bytes":
            return v * _UNIT_BYTES.get(units[i], 1.0) / 1e9
        if scale == "ms":
            return v * _UNIT_MS.get(units[i], 1.0)
        return v

    stall_cols = [h for h in hdr if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")]
    out: dict = {}
    for r in vals:
        name = r[col["Kernel Name"]]
        k = out.setdefault(name, collections.Counter())
        k["launches"] += 1
        k["ms"] += value(r, "gpu__time_duration.sum", "ms")
        k["dram_read_gb"] += value(r, "dram__bytes_read.sum", "bytes")
        k["dram_write_gb"] += value(r, "dram__bytes_write.sum", "bytes")
        k["global_load_gb"] += value(r, "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum") * 32 / 1e9
        k["local_load_gb"] += value(r, "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum") * 32 / 1e9
        k["local_store_gb"] += value(r, "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum") * 32 / 1e9
        k["l2_pct"] = max(k["l2_pct"], value(r, "lts__throughput.avg.pct_of_peak_sustained_elapsed"))
        k["sm_pct"] = max(k["sm_pct"], value(r, "sm__throughput.avg.pct_of_peak_sustained_elapsed"))
        k["registers"] = value(r, "launch__registers_per_thread")
        for h in stall_cols:
            k["stall:" + h[len("smsp__average_warps_issue_stalled_"):-len("_per_issue_active.ratio")]] += value(r, h)
    for k in out.values():
        for key in [s for s in k if s.startswith("stall:")]:
            k[key] /= k["launches"]
    return {name: dict(k) for name, k in out.items()}


def sass_summary(path: str, top: int) -> list[dict]:
    """Per kernel block of the source page: samples by stall reason and opcode, and the top instructions."""
    blocks: list[dict] = []
    cur = None
    for line in _lines(path):
        if line and line[0] == "Kernel Name":
            cur = {"kernel": line[1], "rows": []}
            blocks.append(cur)
        elif cur is not None and "hdr" not in cur:
            cur["hdr"] = line
        elif cur is not None:
            cur["rows"].append(line)
    out = []
    for b in blocks:
        hdr = b["hdr"]
        col = {h: i for i, h in enumerate(hdr)}
        rows = [r for r in b["rows"] if len(r) == len(hdr)]
        samples = "Warp Stall Sampling (All Samples)"
        total = sum(_num(r[col[samples]]) for r in rows) or 1.0
        reasons = [h for h in hdr if h.startswith("stall_") and "(Not" not in h]
        by_reason: collections.Counter = collections.Counter()
        by_op: collections.Counter = collections.Counter()
        for r in rows:
            for h in reasons:
                by_reason[h[len("stall_"):]] += _num(r[col[h]])
            words = [w for w in r[col["Source"]].split() if not w.startswith("@")]
            by_op[words[0].split(".")[0] if words else "?"] += _num(r[col[samples]])
        hot = sorted(rows, key=lambda r: -_num(r[col[samples]]))[:top]
        out.append({
            "kernel": b["kernel"], "instructions": len(rows), "samples": total,
            "by_reason_pct": {k: 100 * v / total for k, v in by_reason.most_common() if v},
            "by_opcode_pct": {k: 100 * v / total for k, v in by_op.most_common(16) if v},
            "top": [{"pct": 100 * _num(r[col[samples]]) / total, "sass": " ".join(r[col["Source"]].split()),
                     "stalls": {h[len("stall_"):]: _num(r[col[h]]) for h in reasons if _num(r[col[h]])}} for r in hot],
        })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", action="append", default=[], help="a raw-page csv (repeatable)")
    ap.add_argument("--sass", action="append", default=[], help="a source-page csv with SASS (repeatable)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    if not args.raw and not args.sass:
        ap.error("give --raw and/or --sass")
    report = {"raw": {p: raw_summary(p) for p in args.raw}, "sass": {p: sass_summary(p, args.top) for p in args.sass}}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    for path, kernels in report["raw"].items():
        print(f"== {path}")
        for name, k in kernels.items():
            stalls = sorted(((s[6:], v) for s, v in k.items() if s.startswith("stall:") and v >= 0.1), key=lambda x: -x[1])
            print(f"{name[:32]:32s} x{k['launches']:.0f} {k['ms']:8.3f} ms  DRAM r/w {k['dram_read_gb']:.2f}/{k['dram_write_gb']:.2f} GB"
                  f"  L1 global ld {k['global_load_gb']:.2f} GB, local ld/st {k['local_load_gb']:.2f}/{k['local_store_gb']:.2f} GB"
                  f"  L2 {k['l2_pct']:.0f}%  SM {k['sm_pct']:.0f}%  regs {k['registers']:.0f}")
            print("    stalls per issued instruction: " + ", ".join(f"{s} {v:.2f}" for s, v in stalls))
    for path, blocks in report["sass"].items():
        print(f"== {path}")
        for b in blocks:
            print(f"{b['kernel']}: {b['instructions']} instructions, {b['samples']:.0f} samples")
            print("    by reason: " + ", ".join(f"{k} {v:.1f}%" for k, v in list(b["by_reason_pct"].items())[:8]))
            print("    by opcode: " + ", ".join(f"{k} {v:.1f}%" for k, v in list(b["by_opcode_pct"].items())[:10]))
            for t in b["top"]:
                print(f"    {t['pct']:5.1f}%  {t['sass'][:70]:70s} " + " ".join(f"{k}={v:.0f}" for k, v in t["stalls"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Merge one results folder into `<date>-<gpu>.json` and print the short table (bench/gpu_check.sh).

    python -m gpt2_fast.benchmarks.summary RESULTS_DIR [--stages STAGES_JSON] [--no-write]

Reads the newest kernels-*.json, decode-*.json (one per model) and train-*.json in the folder,
adds the gpu_check stage statuses when given, writes the merged file next to them, and prints:
the stages; per op and mode the best of ours beside the best peer (largest shape measured);
decode ms/token per peer and model beside the issue's targets; train tokens/s, MFU and peak
memory per peer beside the target.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional

from . import common

OURS = ("triton", "cuda", "cpp")
# Issue 6's targets (peers measured on an H200 by the issue's author, not here).
DECODE_TARGET_MS = {"gpt2": 0.20, "gpt2-xl": 1.10}
TRAIN_TARGET = {"gpt2": (600e3, 13.0)}  # tokens/s at least, peak GB at most


def _newest(folder: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, pattern)), key=os.path.getmtime)


def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def collect(folder: str, stages: Optional[dict] = None) -> dict:
    out: dict = {"stages": stages or {}}
    k = _newest(folder, "kernels-*.json")
    out["kernels"] = _load(k[-1]) if k else None
    decode = {}
    for p in _newest(folder, "decode-*.json"):
        d = _load(p)
        if d and d.get("kind") == "decode":
            decode[d.get("model", os.path.basename(p))] = d  # newest per model wins
    out["decode"] = decode
    t = [p for p in _newest(folder, "train-*.json") if (_load(p) or {}).get("kind") == "train"]
    out["train"] = _load(t[-1]) if t else None
    st = next((x["stamp"] for x in [out["kernels"], out["train"], *decode.values()] if x), None)
    out["stamp"] = st
    return out


def kernel_lines(k: dict) -> list[str]:
    rows = [r for r in k.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return ["kernels: no measurement"]
    by_op: dict = {}
    for r in rows:
        by_op.setdefault((r["op"], r["mode"]), []).append(r)
    table = []
    for (op, mode), rs in by_op.items():
        shape = max(rs, key=lambda r: r.get("work") or 0)["shape"]  # the largest shape
        rs = [r for r in rs if r["shape"] == shape]
        ours = [r for r in rs if r["provider"] in OURS]
        peers = [r for r in rs if r["provider"] not in OURS]
        best_o = min(ours, key=lambda r: r["ms"]) if ours else None
        best_p = min(peers, key=lambda r: r["ms"]) if peers else None
        table.append(dict(op=op, mode=mode, shape=shape,
                          ours=f"{best_o['provider']} {common.fmt(best_o['ms'])} ms" if best_o else "-",
                          ours_val=f"{common.fmt(best_o['value'])} {best_o['metric']} "
                                   f"({common.fmt(best_o.get('pct_ceiling'))}%"
                                   f"{'!' if common.impossible_keys(best_o) else ''})" if best_o else "-",
                          peer=f"{best_p['provider']} {common.fmt(best_p['ms'])} ms" if best_p else "-",
                          speedup=(best_p["ms"] / best_o["ms"]) if best_o and best_p else None))
    note = [common.IMPOSSIBLE_NOTE] if any("%!" in t["ours_val"] for t in table) else []
    return ["kernels (largest shape measured; best of ours vs best peer):",
            common.format_table(table, (("op", "op"), ("mode", "mode"), ("shape", "shape"),
                                        ("ours", "ours"), ("ours_val", "ours rate (% ceiling)"),
                                        ("peer", "best peer"), ("speedup", "x peer")))] + note


def decode_lines(decode: dict) -> list[str]:
    if not decode:
        return ["decode: no measurement"]
    table = []
    for model, d in decode.items():
        for r in d.get("rows", []):
            if r.get("status") != "ok":
                table.append(dict(model=model, peer=r["peer"], note=r.get("reason", "")[:60]))
                continue
            target = DECODE_TARGET_MS.get(model) if r["peer"] == "ours" else None
            table.append(dict(model=model, peer=r["peer"], p50=r["ms_per_token_p50"], p90=r["ms_per_token_p90"],
                              ttft=r["ttft_ms"], gbps=r["achieved_gbps"], mem=r.get("peak_mem_gb"),
                              note=(f"target <= {target}: " + ("met" if r["ms_per_token_p50"] <= target else "NOT met"))
                              if target else ""))
    return ["decode (batch 1):",
            common.format_table(table, (("model", "model"), ("peer", "peer"), ("p50", "ms/tok p50"),
                                        ("p90", "p90"), ("ttft", "TTFT ms"), ("gbps", "GB/s"),
                                        ("mem", "peak GB"), ("note", "")))]


def train_lines(t: Optional[dict]) -> list[str]:
    if not t:
        return ["train: no measurement"]
    table = []
    target = TRAIN_TARGET.get(t.get("model")) if t.get("batch") == 16 and t.get("seq") == 1024 else None
    for r in t.get("rows", []):
        if r.get("status") != "ok":
            table.append(dict(peer=r["peer"], note=r.get("reason", "")[:60]))
            continue
        note = ""
        if target and r["peer"] == "ours":
            met = r["tokens_per_s"] >= target[0] and (r.get("peak_mem_gb") or 0) <= target[1]
            note = f"target >= {target[0] / 1e3:.0f}k tok/s at <= {target[1]} GB: {'met' if met else 'NOT met'}"
        table.append(dict(peer=r["peer"], tok=r["tokens_per_s"], mfu=r.get("mfu_datasheet_pct"),
                          mfum=r.get("mfu_measured_pct"), mem=r.get("peak_mem_gb"), note=note))
    return [f"train ({t.get('model')}, B{t.get('batch')} T{t.get('seq')}):",
            common.format_table(table, (("peer", "peer"), ("tok", "tokens/s"), ("mfu", "MFU % sheet"),
                                        ("mfum", "MFU % meas."), ("mem", "peak GB"), ("note", "")),
                                percent_keys=("mfu", "mfum"))]


def summary_text(merged: dict) -> str:
    lines = []
    st = merged.get("stamp")
    if st:
        lines.append(common.stamp_line(st))
    if merged.get("stages"):
        lines.append("stages: " + "; ".join(f"{k}: {v}" for k, v in merged["stages"].items()))
    if merged.get("kernels"):
        lines += kernel_lines(merged["kernels"])
    lines += decode_lines(merged.get("decode") or {})
    lines += train_lines(merged.get("train"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2_fast.benchmarks.summary", description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--stages", default=None, help="a JSON file of {stage: status} from gpu_check.sh")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"summary: {args.folder} is not a folder", file=sys.stderr)
        return 2
    stages = _load(args.stages) if args.stages else None
    merged = collect(args.folder, stages)
    if not args.no_write and merged.get("stamp"):
        st = merged["stamp"]
        name = f"{st['date_utc'][:10]}-{common.slug(st['device'].replace('NVIDIA ', ''))}.json"
        path = common.write_json(os.path.join(args.folder, name), merged)
        print(f"wrote {path}")
    print(summary_text(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared machinery of the benchmarks: timing, ceilings, the stamp, and the writers.

Timing (`bench`):
  CUDA  the triton.testing.do_bench method, written out so it does not depend on a Triton
        version: estimate one call, then `warmup` ms of warm-up calls, then `rep` ms of timed
        calls, each bracketed by its own pair of CUDA events and preceded by a 256 MiB memset
        that flushes the L2 cache; the result is the median (p10 / p90 kept too).
  CPU   time.perf_counter around each call (CPU work is synchronous), median of the calls. No
        cache flush; these are CPU figures and the output says so.

Ceilings (`measure_ceilings`), measured in the same run as the numbers they bound:
  copy_gbps          dst.copy_(src) of a large buffer: (read + write bytes) / time
  matmul_tflops_bf16 an (M, K) @ (K, N) bf16 matmul: 2 M N K / time (CUDA only)
  matmul_tflops_fp32 the same in fp32 (TF32 off, as torch's default)
A memory-bound kernel's "% of ceiling" is its GB/s over copy_gbps; a compute-bound one's is its
TFLOP/s over the matmul rate of its dtype.

Impossible figures: a share of a physical ceiling above 100 % (MFU 602 %, "170 % of ceiling")
means timing noise on a busy machine or a ceiling measured low, never a real speed. Tables mark
such a cell with "!" and a footnote (format_table), and JSON rows get a "suspect" entry
(write_json), so no such figure is quoted by mistake.
"""
from __future__ import annotations

import csv
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Optional, Sequence

import torch

from ..atomic import atomic_write
from ..devices import parse_device  # noqa: F401 (the benchmarks call common.parse_device)

CPU_NOTE = "CPU figures: tiny shapes, few iterations; they say nothing about GPU speed"
PERCENT_OF_CEILING = ("pct_ceiling", "pct_copy_bw", "mfu_datasheet_pct", "mfu_measured_pct")
IMPOSSIBLE_NOTE = ("! above 100% of its ceiling: impossible (timing noise on a busy machine, or a ceiling "
                   "measured low); do not quote it")
CPU_NOTE_FULL = "CPU figures (real shapes); they say nothing about GPU speed"


def cpu_note(quick: bool) -> str:
    return CPU_NOTE if quick else CPU_NOTE_FULL

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity).
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0), ("4090", 165.0),
)


# ---------------------------------------------------------------------------------------------
# devices and memory
# ---------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> Optional[float]:
    """Peak bytes allocated by torch on the GPU since the last reset, in GB; None on CPU (torch
    keeps no per-device peak for CPU tensors: see process_peak_rss_gb)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def process_peak_rss_gb() -> Optional[float]:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    except Exception:
        return None


def datasheet_peak_tflops(name: str) -> Optional[float]:
    """The dense bf16 datasheet peak of a GPU named `name`, or None when it is not in the table."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

_L2_FLUSH: dict = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _L2_FLUSH[key]


def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25.0,
          rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000,
          grad_to_none: Sequence[torch.Tensor] = ()) -> dict:
    """Time fn() on `device`; returns {"ms": median, "p10_ms", "p90_ms", "reps"}.

    grad_to_none: tensors whose .grad is reset before each call, so that accumulation into
    .grad is not timed differently from call to call.
    """
    def clear():
        for t in grad_to_none:
            t.grad = None

    if device.type == "cuda":
        flush = _flush_buffer(device)
        fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end) / 5, 1e-3)
        n_warm = max(1, int(warmup_ms / est))
        n_rep = min(max_reps, max(min_reps, int(rep_ms / est)))
        for _ in range(n_warm):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            clear()
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        t0 = time.perf_counter()
        fn()
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        n_warm = max(1, min(3, int(warmup_ms / est)))
        n_rep = min(max_reps, max(min_reps, int(rep_ms / est)))
        for _ in range(n_warm):
            fn()
        times = []
        for _ in range(n_rep):
            clear()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "p10_ms": quantile(times, 0.1),
            "p90_ms": quantile(times, 0.9), "reps": len(times)}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1] of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------------

def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth and matmul rates measured now, on this device (see the module doc)."""
    out: dict = {}
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (16 << 20 if quick else 128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, rep_ms=20 if quick else 200)
    out["copy_gbps"] = 2 * nbytes / (t["ms"] * 1e-3) / 1e9
    out["copy_bytes"] = nbytes
    del src, dst
    n = 8192 if cuda else (256 if quick else 1024)
    dtypes = [("bf16", torch.bfloat16), ("fp32", torch.float32)] if cuda else [("fp32", torch.float32)]
    for tag, dt in dtypes:
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)
        t = bench(lambda: torch.mm(a, b), device, rep_ms=20 if quick else 200)
        out[f"matmul_tflops_{tag}"] = 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12
        del a, b
    out["matmul_n"] = n
    if cuda:
        _L2_FLUSH.pop(str(device), None)
        torch.cuda.empty_cache()
    return out


def matmul_ceiling(ceilings: dict, dtype: torch.dtype) -> Optional[float]:
    tag = {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}.get(dtype)
    return ceilings.get(f"matmul_tflops_{tag}") if tag else None


# ---------------------------------------------------------------------------------------------
# the stamp
# ---------------------------------------------------------------------------------------------

def module_version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return None


def git_sha() -> str:
    """HEAD of the checkout this package lives in (+ '-dirty'), GPT2_FAST_GIT_SHA, or 'unknown'."""
    env = os.environ.get("GPT2_FAST_GIT_SHA")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def stamp(device: torch.device, quick: bool = True) -> dict:
    """Device, versions, git sha and date: written into every result file."""
    s = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": module_version("triton"),
        "transformers": module_version("transformers"),
        "liger_kernel": module_version("liger_kernel"),
        "gpt2_fast": module_version("gpt2_fast"),
        "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        s.update(sm=f"{p.major}{p.minor}", gpu_memory_gb=round(p.total_memory / 1e9, 1),
                 cudnn=torch.backends.cudnn.version())
    else:
        s["note"] = cpu_note(quick)
    return s


def slug(text: str) -> str:
    """A file-name-safe form of text: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "unknown"


def result_path(out_dir: str, kind: str, st: dict, ext: str) -> str:
    """<out_dir>/<kind>-<YYYYmmdd-HHMM>-<device>.<ext>"""
    when = st["date_utc"].replace("-", "").replace(":", "").replace("T", "-")[:13]
    dev = slug(st["device"].replace("NVIDIA ", "")) if st["device_type"] == "cuda" else "cpu"
    return os.path.join(out_dir, f"{kind}-{when}-{dev}.{ext}")


def default_out_dir() -> str:
    return os.environ.get("OUT") or os.path.join("bench", "results")


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x


def impossible_keys(row: dict, keys: Sequence[str] = PERCENT_OF_CEILING) -> list[str]:
    """The keys of row whose value is a share of a ceiling above 100 %."""
    return [k for k in keys if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
            and math.isfinite(row[k]) and row[k] > 100]


def mark_impossible(rows: Sequence[dict]) -> int:
    """Give each row with an impossible percentage a "suspect" entry; returns how many rows."""
    n = 0
    for r in rows:
        bad = impossible_keys(r)
        if bad:
            r["suspect"] = "; ".join(f"{k} {r[k]:.0f}% > 100%" for k in bad) + \
                ": impossible (timing noise on a busy machine, or a ceiling measured low)"
            n += 1
    return n


def write_json(path: str, obj: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if isinstance(obj.get("rows"), list):
        mark_impossible([r for r in obj["rows"] if isinstance(r, dict)])

    def write(p):
        with open(p, "w") as f:
            json.dump(_jsonable(obj), f, indent=1)
            f.write("\n")
    atomic_write(path, write)
    _readable(path)
    return path


def _readable(path: str) -> None:
    try:
        os.chmod(path, 0o644)  # the temp file of atomic_write is 0600
    except OSError:
        pass


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str], st: dict) -> str:
    """One row per measurement; the stamp goes in '#' comment lines at the top."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(p):
        with open(p, "w", newline="") as f:
            for k in ("date_utc", "git_sha", "device", "torch", "triton", "cuda"):
                f.write(f"# {k}: {st.get(k)}\n")
            if st.get("note"):
                f.write(f"# {st['note']}\n")
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({c: _fmt_csv(r.get(c)) for c in columns})
    atomic_write(path, write)
    _readable(path)
    return path


def _fmt_csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v == 0:
            return "0"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{max(0, digits - 1 - int(math.floor(math.log10(mag))))}f}" if mag >= 1e-3 else f"{v:.2e}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]],
                 percent_keys: Sequence[str] = PERCENT_OF_CEILING) -> str:
    """columns: (key, header). Right-aligned numbers, left-aligned text. A percentage of a ceiling
    (percent_keys) above 100 is marked "!" and explained under the table."""
    cells = [[h for _, h in columns]] + [
        [fmt(r.get(k)) + ("!" if k in impossible_keys(r, percent_keys) else "") for k, _ in columns] for r in rows]
    flagged = any(impossible_keys(r, percent_keys) for r in rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, c in enumerate(row):
            numeric = n > 0 and isinstance(rows[n - 1].get(columns[i][0]), (int, float))
            parts.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if flagged:
        lines.append(IMPOSSIBLE_NOTE)
    return "\n".join(lines)


def stamp_line(st: dict) -> str:
    line = (f"{st['device']} | torch {st['torch']} | triton {st['triton']} | cuda {st['cuda']} | "
            f"git {st['git_sha']} | {st['date_utc']}")
    if st.get("note"):
        line += f"\n{st['note'].upper()}"
    return line


def plot_bars(path: str, groups: dict, st: dict, ylabel_of: Callable[[str], str]) -> Optional[str]:
    """One PNG, one panel per group: {panel title: [(x label, provider, value)]} as grouped bars.

    Returns the path, or None when matplotlib is missing (the tables and CSV still hold it all)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    panels = [(t, pts) for t, pts in groups.items() if pts]
    if not panels:
        return None
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, panels):
        xs = list(dict.fromkeys(p[0] for p in pts))
        provs = list(dict.fromkeys(p[1] for p in pts))
        width = 0.8 / max(1, len(provs))
        for j, prov in enumerate(provs):
            vals = {x: v for x, pv, v in pts if pv == prov}
            pos = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(pos, [vals.get(x, 0.0) for x in xs], width, label=prov)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=20, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel_of(title), fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"gpt2_fast kernels: {st['device']}, torch {st['torch']}, triton {st['triton']}, "
                 f"git {st['git_sha']}, {st['date_utc']}"
                 + ("\n" + st["note"] if st.get("note") else ""), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    _readable(path)
    plt.close(fig)
    return path

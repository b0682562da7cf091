"""The Python half of bench/gpu_check.sh (what reads better in Python than in bash).

    python bench/gpu_check.py sha ROOT                  the tree's git sha, without needing .git
    python bench/gpu_check.py preconditions             gcc, Python.h, tiktoken, pip, nvcc, disk, torch, GPU
    python bench/gpu_check.py ab OUT --deadline EPOCH [--cap S] [--dry-run]
                                                        A/B: every side of every gpt2_fast/choices.py row
    python bench/gpu_check.py summary OUT --stages F    the merged results and the A/B table, printed last

A/B: each row of CHOICES names an environment variable and its sides; for every side the matching
benchmark runs in its own process with the variable set (the dispatcher resolves choices at import),
so one lent GPU measures both sides in the same run. A side whose code does not exist yet is
reported as "not implemented" (NotImplementedError in its output), one that cannot run on this
device as "n/a here"; anything else that fails is FAILED. Results: OUT/ab.json (each side's status,
figure, command and result rows; the benchmarks' own files stay in a temp dir).
Only the standard library at module level: the sha and precondition steps run before anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

# benchmark per choice row (by name; unknown names by prefix): gpt2-fast bench <args>
_KERNEL_ATTN = ["kernels", "--ops", "attention", "--presets", "gpt2", "--seqs", "1024", "--providers", "triton"]
_DECODE = ["decode", "--model", "gpt2", "--batch", "1", "--prompt-len", "128", "--new-tokens", "64",
           "--peers", "ours"]
AB_BENCH = {
    "attention_bwd": _KERNEL_ATTN + ["--modes", "bwd"],
    "attention_fwd": _KERNEL_ATTN + ["--modes", "fwd"],
    "decode_step": _DECODE,
    "decode_runner": _DECODE,
    "int8_matmul": _DECODE + ["--int8"],
}
_NOT_IMPLEMENTED = re.compile(r"NotImplementedError|not (yet )?implemented", re.I)
_NOT_HERE = re.compile(r"needs CUDA|requires CUDA|CUDA is not available|no CUDA|only on CUDA|needs a GPU", re.I)


def _dry(args: list[str]) -> list[str]:
    """The dry run's (CPU) form of a benchmark's arguments: its quick mode's own tiny shapes."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--presets", "--seqs", "--prompt-len", "--new-tokens"):
            skip = True
        else:
            out.append(a)
    return out


def bench_args(name: str):
    """The `gpt2-fast bench` arguments that measure choice `name`, or None when none does."""
    if name in AB_BENCH:
        return list(AB_BENCH[name])
    if name.startswith("attention"):
        return _KERNEL_ATTN + ["--modes", "bwd" if "bwd" in name else "fwd"]
    if name.startswith("decode") or name.startswith("int8"):
        return list(_DECODE)
    return None


# ---------------------------------------------------------------------------------------------
# sha, preconditions
# ---------------------------------------------------------------------------------------------

def git_sha(root: str) -> str:
    """GPT2_FAST_GIT_SHA, else <root>/.git_sha (a file written where the tree was copied from), else
    `git rev-parse` (+ -dirty), else "unknown"."""
    env = os.environ.get("GPT2_FAST_GIT_SHA", "").strip()
    if env:
        return env
    path = os.path.join(root, ".git_sha")
    if os.path.isfile(path):
        with open(path) as f:
            sha = f.read().strip()
        if sha:
            return sha
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _first_line(cmd: list[str], containing: str = "") -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if containing in ln]
        return lines[0] if lines else f"rc {p.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"not runnable ({type(e).__name__})"


def _module_version(name: str) -> str:
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "importable")
    except Exception as e:  # noqa: BLE001  (reported, never raised)
        return f"MISSING ({type(e).__name__}: {e})"[:120]


def preconditions() -> list[tuple[str, str]]:
    """(what, finding) pairs; nothing here fails: later stages read the log."""
    out = []
    gcc = shutil.which("gcc") or shutil.which("cc")
    out.append(("gcc", f"{gcc}: {_first_line([gcc, '--version'])}" if gcc else "MISSING (no gcc/cc on PATH)"))
    inc = sysconfig.get_paths()["include"]
    out.append(("Python.h", inc if os.path.isfile(os.path.join(inc, "Python.h")) else f"MISSING in {inc}"))
    for mod in ("torch", "triton", "tiktoken", "numpy", "transformers", "pytest", "ninja", "setuptools"):
        out.append((mod, _module_version(mod)))
    pip = _first_line([sys.executable, "-m", "pip", "--version"])
    site = sysconfig.get_paths()["purelib"]
    out.append(("pip", f"{pip}; site-packages {'writable' if os.access(site, os.W_OK) else 'READ-ONLY'}; "
                       f"PIP_NO_INDEX={os.environ.get('PIP_NO_INDEX', '')} (nothing is downloaded)"))
    nvcc = shutil.which("nvcc")
    out.append(("nvcc", f"{nvcc}: {_first_line([nvcc, '--version'], 'release')}" if nvcc else "none on PATH"))
    out.append(("CUDA_HOME", os.environ.get("CUDA_HOME", "(unset)")))
    for path in sorted({os.getcwd(), "/tmp", os.environ.get("OUT", "/tmp")}):
        try:
            free = shutil.disk_usage(path).free / 2**30
            out.append((f"free disk {path}", f"{free:.1f} GiB" + (" LOW" if free < 5 else "")))
        except OSError as e:
            out.append((f"free disk {path}", f"unknown ({e})"))
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        out.append(("device", f"torch {torch.__version__} CUDA {torch.version.cuda}, GPU: {gpu}"))
    except Exception as e:  # noqa: BLE001
        out.append(("device", f"torch not importable ({e})"))
    return out


# ---------------------------------------------------------------------------------------------
# A/B
# ---------------------------------------------------------------------------------------------

_HELP: dict = {}


def _bench_help(kind: str, timeout: float) -> str:
    """`gpt2-fast bench <kind> --help`, to tell a flag the benchmark lacks from a failure."""
    if kind not in _HELP:
        try:
            p = subprocess.run([sys.executable, "-m", "gpt2_fast", "bench", kind, "--help"], capture_output=True,
                               text=True, timeout=max(1.0, timeout))
            _HELP[kind] = p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            return ""  # unknown: the side runs and its own error tells
    return _HELP[kind]


def _run_side(cmd: list[str], env: dict, timeout: float, log_path: str) -> tuple[int, str]:
    """Run cmd in its own process group, killed (whole group) after `timeout` s; rc 124 then."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = 124
    with open(log_path, errors="replace") as f:
        return rc, f.read()


def _result(folder: str) -> dict:
    """The JSON the benchmark wrote into folder ({} when none)."""
    files = sorted((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")),
                   key=os.path.getmtime)
    if not files:
        return {}
    with open(files[-1]) as f:
        return json.load(f)


def _figure(data: dict, kind: str):
    """(value, text) of ours from a benchmark's result, or (None, why)."""
    if not data:
        return None, "no result file"
    rows = data.get("rows", [])
    if kind == "kernels":
        ours = [r for r in rows if r.get("provider") == "triton"]
        ok = [r for r in ours if r.get("status") == "ok"]
        if not ok:
            return None, (ours[0].get("status", "no row") if ours else "no triton row")
        r = ok[-1]
        return r["ms"], f"{r['ms']:.3f} ms ({r.get('value', 0):.4g} {r.get('metric', '')}, {r.get('shape', '')})"
    ok = [r for r in rows if r.get("peer") == "ours" and r.get("ms_per_token_p50") is not None]
    if not ok:
        return None, "no row for ours"
    return ok[-1]["ms_per_token_p50"], f"{ok[-1]['ms_per_token_p50']:.3f} ms/token (p50)"


def _side_status(rc: int, text: str, value) -> str:
    if rc == 0 and value is not None:
        return "ok"
    if rc == 124:
        return "timed out"
    if _NOT_IMPLEMENTED.search(text):
        return "not implemented"
    if _NOT_HERE.search(text):
        return "n/a here"
    return f"FAILED rc={rc}"


def run_ab(out: str, deadline: float, cap: float, dry_run: bool, rows: str = "") -> int:
    """Every side of every choice (or of the comma list `rows`); OUT/ab.json. rc 1 when a side
    FAILED (not: not implemented, n/a here, timed out, skipped)."""
    from gpt2_fast.choices import CHOICES
    CHOICES = {k: v for k, v in CHOICES.items() if not rows or k in rows.split(",")}
    results = {name: {"env": c.env, "default": c.default, "sides": {s: {"status": "not run"} for s in c.options}}
               for name, c in CHOICES.items()}
    _write_json(os.path.join(out, "ab.json"), results)  # the plan first: a killed stage still leaves it
    failed = False
    for name, c in CHOICES.items():
        args = bench_args(name)
        for side in c.options:
            entry = results[name]["sides"][side]
            left = deadline - time.time()
            if args is not None and left <= 20:  # no time to read --help either: never run a side blind
                entry.update(status=f"skipped: {left:.0f} s of the budget left")
                continue
            helptext = _bench_help(args[0], left - 15) if args else ""
            missing = [a for a in args or [] if a.startswith("--") and helptext and a not in helptext]
            if args is None or missing:
                entry.update(status="not measured: " + (f"gpt2-fast bench {args[0]} has no {missing[0]}"
                             if args else "no benchmark mapped (bench/gpu_check.py AB_BENCH)"))
                print(f"ab: {name} {c.env}={side}: {entry['status']}", flush=True)
                continue
            if left < 15:
                entry.update(status=f"skipped: {left:.0f} s of the budget left")
                continue
            folder = tempfile.mkdtemp(prefix=f"ab-{name}-{side}-")  # only ab.json goes to OUT
            cmd = [sys.executable, "-m", "gpt2_fast", "bench", *(_dry(args) if dry_run else args), "--quick",
                   "--out", folder] + (["--device", "cpu"] if dry_run else [])
            env = {**os.environ, c.env: side}
            t0 = time.time()
            rc, text = _run_side(cmd, env, min(cap, left - 10), os.path.join(folder, "log.txt"))
            data = _result(folder) if rc == 0 else {}
            shutil.rmtree(folder, ignore_errors=True)
            value, figure = _figure(data, args[0]) if rc == 0 else (None, "")
            status = _side_status(rc, text, value)
            failed |= status.startswith("FAILED")
            entry.update(status=status, seconds=round(time.time() - t0, 1), value=value, figure=figure,
                         command=" ".join(cmd[1:-2]), env=f"{c.env}={side}", rows=data.get("rows"),
                         tail=None if status == "ok" else text.strip().splitlines()[-5:])
            print(f"ab: {name} {c.env}={side}: {status} {figure} ({entry['seconds']} s)", flush=True)
            _write_json(os.path.join(out, "ab.json"), results)  # after every side: a kill loses none
    _write_json(os.path.join(out, "ab.json"), results)
    return 1 if failed else 0


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def ab_lines(out: str) -> list[str]:
    path = os.path.join(out, "ab.json")
    if not os.path.isfile(path):
        return ["A/B: no ab.json (the A/B stage did not run)"]
    with open(path) as f:
        results = json.load(f)
    lines = ["A/B (gpt2_fast/choices.py; both sides measured in this run, lower is better):"]
    for name, r in results.items():
        sides = r["sides"]
        measured = {s: e["value"] for s, e in sides.items() if e.get("value") is not None}
        best = min(measured, key=measured.get) if len(measured) == len(sides) and len(sides) > 1 else None
        for side, e in sides.items():
            mark = " <- fastest" if side == best else ""
            lines.append(f"  {name:22s} {r['env'] + '=' + side:40s} {e.get('status', '?'):16s} "
                         f"{e.get('figure') or ''}{mark}")
    return lines


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

def summary(out: str, stages_path: str, extra: dict) -> int:
    """gpu_check.json and the A/B table first (cheap), then the merged benchmark summary (it imports
    torch), so that a summary cut short by the budget still leaves the essentials."""
    with open(stages_path) as f:
        stages = json.load(f)
    doc = {**extra, "stages": stages}
    ab = os.path.join(out, "ab.json")
    if os.path.isfile(ab):
        with open(ab) as f:
            doc["ab"] = json.load(f)
    _write_json(os.path.join(out, "gpu_check.json"), doc)
    print("stages: " + "; ".join(f"{k}: {v}" for k, v in stages.items()))
    print("\n".join(ab_lines(out)), flush=True)
    print()
    try:
        from gpt2_fast.benchmarks import summary as merged
        return merged.main([out, "--stages", stages_path])
    except Exception as e:  # noqa: BLE001  (the summary path must always end cleanly)
        print(f"gpu_check: the merged summary failed ({type(e).__name__}: {e})")
        return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sha").add_argument("root")
    sub.add_parser("preconditions")
    p = sub.add_parser("ab")
    p.add_argument("out")
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds: no side starts after")
    p.add_argument("--cap", type=float, default=90.0, help="seconds per side at most")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--rows", default="", help="comma list of choices.py rows (default: all)")
    p = sub.add_parser("summary")
    p.add_argument("out")
    p.add_argument("--stages", required=True)
    p.add_argument("--extra", default="{}", help="JSON merged into gpu_check.json (sha, budget, ...)")
    args = ap.parse_args(argv)
    if args.cmd == "sha":
        print(git_sha(args.root))
    elif args.cmd == "preconditions":
        for what, finding in preconditions():
            print(f"precondition {what}: {finding}")
    elif args.cmd == "ab":
        return run_ab(args.out, args.deadline, args.cap, args.dry_run, args.rows)
    elif args.cmd == "summary":
        return summary(args.out, args.stages, json.loads(args.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU training step of GPT-2 124M at B=4, T=256 (fp32): gpt2_fast beside HF transformers'
GPT2LMHeadModel with the same weights, in the same run.

    .venv/bin/python bench/cpu_train_step.py [--reps 3] [--batch 4] [--seq 256] [--bf16] [--out FILE]

One step = forward with the loss, backward, AdamW step, zero_grad; --bf16 runs both under bf16
autocast (what `make demo` trains in on CPUs with AVX512-BF16 / AMX). gpt2_fast runs its training
path (`model(x, y, return_logits=False)`: fused LM head + cross-entropy, backend "auto"); HF runs
`model(input_ids=x, labels=x)` (its own shift, attn_implementation "sdpa"). The runs are
interleaved (ours, HF, ours, HF ...) so background load hits both alike; the median is reported.
Napkin math: 6 N T B + 12 L C T^2 B ~ 0.78 TFLOP per step for N = 124M, B*T = 1024, so a step
takes seconds on a laptop-class CPU. These are CPU figures: they say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt2_fast import ops  # noqa: E402
from gpt2_fast.config import GPTConfig  # noqa: E402
from gpt2_fast.model import GPT  # noqa: E402


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--backend", default="auto", help="gpt2_fast backend (auto, torch, cpp, triton)")
    p.add_argument("--bf16", action="store_true", help="both models under torch.autocast(bf16)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "cpu-train-step.json"))
    args = p.parse_args()
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_name("gpt2", backend=args.backend)).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").train()
    x = torch.randint(0, 50257, (args.batch, args.seq + 1))
    opts = {"gpt2_fast": torch.optim.AdamW(ours.parameters(), lr=1e-4),
            "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def step_ours():
        with autocast():
            _, loss = ours(x[:, :-1], x[:, 1:], return_logits=False)   # T inputs, T predictions
        loss.backward()
        opts["gpt2_fast"].step()
        opts["gpt2_fast"].zero_grad(set_to_none=True)
        return float(loss.detach())

    def step_hf():
        with autocast():
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # T inputs; HF shifts inside (T-1 predictions)
        loss.backward()
        opts["hf"].step()
        opts["hf"].zero_grad(set_to_none=True)
        return float(loss.detach())

    steps = {"gpt2_fast": step_ours, "hf": step_hf}
    first = {k: fn() for k, fn in steps.items()}  # warm-up; same weights, so nearly the same first loss
    times = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tokens = args.batch * args.seq
    print(f"CPU FIGURES: GPT-2 124M train step, B={args.batch}, T={args.seq}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (median)")
    print(f"{'model':12s} {'step s':>8s} {'tok/s':>8s} {'first loss':>11s}")
    for k in steps:
        print(f"{k:12s} {med[k]:8.2f} {tokens / med[k]:8.0f} {first[k]:11.4f}")
    print(f"gpt2_fast / hf step time: {med['gpt2_fast'] / med['hf']:.2f}x")
    backends = {op: ops.resolve(op, args.backend, "cpu")[0] for op in ops.OPS}
    result = {
        "bench": "cpu_train_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_sha": git_sha(), "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "python": platform.python_version(),
        "batch": args.batch, "seq": args.seq, "reps": args.reps, "backend": args.backend,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "backends_used": backends, "median_step_s": med, "all_step_s": times, "first_loss": first,
        "load_average": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

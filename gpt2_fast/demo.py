"""`gpt2-fast demo` (what `make demo` runs): the whole training story on the bundled corpus.

1. prepare: tokenize the bundled King James Bible (~1.02M GPT-2 tokens) into train/val shards
   under OUT/data (a rerun finds them there and skips this);
2. train a small GPT-2 from scratch for a wall-clock budget (default 300 s on CPU, 150 s on a
   GPU) into OUT/train. The learning rate warms up over a few steps, then decays along a cosine
   over the *time* budget (TrainConfig.time_schedule), so a slow or busy machine runs fewer steps
   but still ends at the low rate instead of being cut off at a high one;
3. evaluate the checkpoint on the whole validation split and report the loss / perplexity
   beside the unigram baseline (the loss of a model that ignores context), tokens/s and steps,
   and write the loss curve to OUT/train/loss.png;
4. load the checkpoint back and generate a sample from it.

A rerun replaces the files the previous demo run wrote in OUT/train (checkpoints, log.jsonl,
config.json, loss.png: gpt2_fast.run_dir.is_run_file) and nothing else; other files there stay.

Choices for this 2-core CPU: 4 layers x 256 wide (the 50257-row LM head is most of a step's work
at this width), B=4 x T=256 tokens per step (more updates per token beat bigger steps this early
in training), fused AdamW, the C++ CPU ops where they win ("auto"): above all the fused LM head +
cross-entropy (csrc/cpu/lm_head_loss.cpp), which took a bf16 step from ~735 to ~300 ms. Precision:
bf16 autocast on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), fp32 elsewhere. Peak LR
1.5e-3: four 300 s runs on this machine (the fused op, bf16, other work running beside them) gave
val perplexity 107.5 at 3e-3 (747 steps), 98.6 at 2e-3 (631 steps), 65.0 at 1.5e-3 (919 steps)
and 67.0 at 1e-3 (865 steps); the training loss at equal steps ranked them the same way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .config import TrainConfig
from .data import DEFAULT_CORPUS, prepare, unigram_baseline

MODEL = dict(model="gpt2", n_layer=4, n_head=4, n_embd=256, block_size=256)
CPU = dict(batch_size=4, lr=1.5e-3, budget=300.0)
GPU = dict(batch_size=32, lr=1.5e-3, budget=150.0)
MAX_STEPS = 100_000  # a cap: with a time budget, the clock ends the run


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepared(data_dir: str, corpus: str) -> bool:
    """Whether data_dir already holds the shards of `corpus` (same file, same size)."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        src = meta["sources"]
        return (len(src) == 1 and src[0]["bytes"] == os.path.getsize(corpus)
                and os.path.basename(src[0]["path"]) == os.path.basename(corpus)
                and all(os.path.exists(os.path.join(data_dir, s)) for v in meta["shards"].values() for s in v))
    except (OSError, KeyError, ValueError, TypeError):
        return False


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16; Linux cpuinfo flags)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_config(data_dir: str, run_dir: str, dev: torch.device, budget_s: float, steps: int | None,
                 batch_size: int | None, lr: float | None) -> TrainConfig:
    """The demo's TrainConfig: a time budget (cosine over the clock), or exactly `steps` steps."""
    hw = GPU if dev.type == "cuda" else CPU
    lr = lr or hw["lr"]
    max_steps = steps or MAX_STEPS
    return TrainConfig(
        **MODEL, data=data_dir, out_dir=run_dir, overwrite=True, device=str(dev),
        batch_size=batch_size or hw["batch_size"], seq_len=256, total_batch_size=0, grad_accum=1,
        lr=lr, min_lr=lr / 10, warmup_steps=min(10, max(1, max_steps // 10)), weight_decay=0.1, beta2=0.99,
        grad_clip=1.0, seed=1337, data_order="random", max_steps=max_steps,
        max_seconds=0.0 if steps else budget_s, time_schedule=not steps,
        # one evaluation, at the end, over the whole val split (eval_iters=0)
        eval_interval=max_steps, eval_iters=0, keep_best=False, ckpt_interval=0, keep_last=1,
        log_interval=1, sample_interval=0, plot=False, tensorboard=False,
        dtype="auto" if dev.type == "cuda" else ("bfloat16" if cpu_has_fast_bf16() else "float32"))


def demo(out: str = "out/demo", budget_s: float | None = None, steps: int | None = None,
         batch_size: int | None = None, device: str | None = None, prompt: str = "And God said",
         corpus: str = DEFAULT_CORPUS, lr: float | None = None, sample_tokens: int = 48) -> dict:
    from .devices import parse_device
    from .train import train
    t_start = time.time()
    dev = parse_device(device)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"--budget must be > 0 seconds, got {budget_s}")
    data_dir, run_dir = os.path.join(out, "data"), os.path.join(out, "train")

    # 1. data --------------------------------------------------------------------------------
    if prepared(data_dir, corpus):
        _say(f"[1/4] data: cached shards in {data_dir}")
    else:
        _say(f"[1/4] data: tokenizing {os.path.basename(corpus)} into {data_dir}")
        meta = prepare([corpus], data_dir, name="kjv", val_fraction=0.05, progress=False)
        _say(f"      {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens "
             f"in {meta['seconds']:.1f} s")
    base = unigram_baseline(data_dir)

    # 2. train -------------------------------------------------------------------------------
    budget = budget_s if budget_s is not None else (GPU if dev.type == "cuda" else CPU)["budget"]
    cfg = train_config(data_dir, run_dir, dev, budget, steps, batch_size, lr)
    m = cfg.model_config()
    _say(f"[2/4] train: {m.n_layer} x {m.n_embd} GPT-2 on {dev}, "
         + (f"{steps} steps" if steps else f"a {budget:.0f} s budget (load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"))
    result = train(cfg)
    if result["interrupted"]:
        _say(f"demo interrupted; checkpoint {result['checkpoint']}")
        return result

    # 3. report ------------------------------------------------------------------------------
    from .plots import plot_loss_curve
    png = plot_loss_curve(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "loss.png"),
                          baseline=base["loss"],
                          title=f"gpt2_fast demo: {m.n_layer}x{m.n_embd} GPT-2 on the KJV Bible")
    val, tok_s = result["val_loss"], result["tokens"] / max(result["seconds"], 1e-9)
    val_text = "no val split" if val is None else \
        f"val loss {val:.3f} (perplexity {math.exp(val):.1f}, whole val split: {result['val_tokens']:,} tokens)"
    _say(f"[3/4] {val_text} vs unigram baseline {base['loss']:.3f} (perplexity {base['ppl']:.1f}); "
         f"{result['step']} steps, {result['tokens']:,} tokens in {result['seconds']:.0f} s = {tok_s:,.0f} tokens/s; "
         f"checkpoint {result['checkpoint']}" + (f"; loss curve {png}" if png else ""))

    # 4. sample from the saved checkpoint ------------------------------------------------------
    from .generate import generate
    from .load import load_model
    model = load_model(result["checkpoint"], device=dev)
    sample = generate(model, prompt, max_new_tokens=sample_tokens, temperature=0.7, top_k=40, seed=0)
    _say(f"[4/4] sample ({sample.summary()}):")
    print(prompt + sample.texts[0], flush=True)
    total = time.time() - t_start
    _say(f"demo done in {total / 60:.1f} min. Try: gpt2-fast generate --model {result['checkpoint']} "
         f"--prompt \"And Jesus said\" --top-k 40")
    return {**result, "baseline_loss": base["loss"], "baseline_ppl": base["ppl"], "sample": sample.texts[0],
            "wall_seconds": total, "tokens_per_s": tok_s, "plot": png}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo",
                   help="folder for the shards (OUT/data) and the run (OUT/train; a rerun replaces the "
                        "previous demo's files there and nothing else)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of training (default 300 on CPU, 150 on GPU); the learning rate decays "
                        "over this time")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 32 on GPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--prompt", default="And God said", help="prompt of the final sample")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1.5e-3 on CPU and GPU)")


def run(args) -> int:
    out = demo(args.out, args.budget, args.steps, args.batch_size, args.device, args.prompt, lr=args.lr)
    return 130 if out.get("interrupted") else 0

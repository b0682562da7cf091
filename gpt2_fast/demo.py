"""`gpt2-fast demo` (what `make demo` runs): the whole training story on the bundled corpus.

1. prepare: tokenize the bundled King James Bible (~1.02M GPT-2 tokens) into train/val shards
   under out/demo/data (a rerun finds them there and skips this);
2. train a small GPT-2 (6 layers, 384 wide, T=256) from scratch for a time budget (a few minutes
   on a laptop-class CPU; on a GPU the same command runs many more steps in about as long),
   with a progress bar, checkpointing at the end;
3. report the val loss / perplexity beside the unigram baseline (the loss of a model that
   ignores context), and write the loss curve to out/demo/train/loss.png;
4. load the checkpoint back and generate a sample from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

from .config import TrainConfig
from .data import DEFAULT_CORPUS, prepare, unigram_baseline

MODEL = dict(model="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256)


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


def calibrate_step_seconds(cfg: TrainConfig, device: torch.device) -> float:
    """Seconds of one training step of this model on this device (one warm-up step, then one)."""
    from .model import GPT
    from .train import make_optimizer
    torch.manual_seed(0)
    model = GPT(cfg.model_config()).to(device)
    opt = make_optimizer(model, cfg, fused=device.type == "cuda")
    x = torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len), device=device)
    bf16 = device.type == "cuda"
    times = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, x, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - t)
    return times[-1]


def demo(out: str = "out/demo", budget_s: float | None = None, steps: int | None = None,
         batch_size: int | None = None, device: str | None = None, prompt: str = "And God said",
         corpus: str = DEFAULT_CORPUS, lr: float | None = None) -> dict:
    t_start = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    data_dir, run_dir = os.path.join(out, "data"), os.path.join(out, "train")

    # 1. data --------------------------------------------------------------------------------
    if prepared(data_dir, corpus):
        _say(f"[1/4] data: cached shards in {data_dir}")
    else:
        _say(f"[1/4] data: tokenizing {os.path.basename(corpus)} into {data_dir}")
        meta = prepare([corpus], data_dir, name="kjv", val_fraction=0.05)
        _say(f"      {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens "
             f"in {meta['seconds']:.1f} s")
    base = unigram_baseline(data_dir)

    # 2. train -------------------------------------------------------------------------------
    B = batch_size or (32 if on_gpu else 4)
    cfg_kw = dict(MODEL, data=data_dir, out_dir=run_dir, batch_size=B, seq_len=256, grad_accum=1,
                  lr=lr or (2e-3 if not on_gpu else 1.5e-3), weight_decay=0.1, beta2=0.99, grad_clip=1.0,
                  seed=1337, device=str(dev), data_order="random", ckpt_interval=0, keep_last=1,
                  log_interval=1, sample_interval=0, plot=False, tensorboard=False, max_steps=1)
    steps_given = steps is not None
    budget = budget_s if budget_s is not None else (150.0 if on_gpu else 300.0)
    if steps is None:
        step_s = calibrate_step_seconds(TrainConfig(**cfg_kw), dev)
        # the evals (about 1/3 of a step per batch) take some of the budget
        steps = max(10, min(20000, int(budget / (step_s * 1.07))))
        _say(f"[2/4] train: {step_s:.2f} s/step on {dev} -> {steps} steps in about {budget:.0f} s")
    else:
        _say(f"[2/4] train: {steps} steps on {dev}")
    cfg = TrainConfig(**{**cfg_kw, "max_steps": steps, "min_lr": cfg_kw["lr"] / 10,
                         "warmup_steps": max(3, steps // 15), "eval_interval": max(1, steps // 2),
                         "eval_iters": 24 if on_gpu else 4,
                         # a guard for a machine that slows down mid-run (shared CPUs): stop early
                         "max_seconds": 0.0 if steps_given and budget_s is None else 1.25 * budget})
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # the demo always trains afresh
    from .train import train
    result = train(cfg)
    if result["interrupted"]:
        _say(f"demo interrupted; checkpoint {result['checkpoint']}")
        return result

    # 3. report ------------------------------------------------------------------------------
    from .plots import plot_loss_curve
    png = plot_loss_curve(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "loss.png"),
                          baseline=base["loss"], title="gpt2_fast demo: 6x384 GPT-2 on the KJV Bible")
    val = result["val_loss"]
    _say(f"[3/4] val loss {val:.3f} (perplexity {math.exp(val):.1f}) vs unigram baseline "
         f"{base['loss']:.3f} (perplexity {base['ppl']:.1f}); checkpoint {result['checkpoint']}"
         + (f"; loss curve {png}" if png else ""))

    # 4. sample from the saved checkpoint ------------------------------------------------------
    from .checkpoint import load_model_from_checkpoint
    from .generate import generate
    model = load_model_from_checkpoint(result["checkpoint"]).to(dev)
    t = time.perf_counter()
    sample = generate(model, prompt, max_new_tokens=48, temperature=0.8, top_k=40, seed=0)
    _say(f"[4/4] sample ({sample.summary()}):")
    print(prompt + sample.texts[0], flush=True)
    total = time.time() - t_start
    _say(f"demo done in {total / 60:.1f} min. Try: gpt2-fast generate --model {result['checkpoint']} "
         f"--prompt \"And Jesus said\" --top-k 40")
    return {**result, "baseline_loss": base["loss"], "baseline_ppl": base["ppl"], "sample": sample.texts[0],
            "seconds": total, "steps": steps, "plot": png}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the shards, checkpoint and plot")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of training (default 300 on CPU, 150 on GPU); sets the step count")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 32 on GPU")
    p.add_argument("--device", default=None)
    p.add_argument("--prompt", default="And God said")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 CPU, 1.5e-3 GPU)")


def run(args) -> int:
    out = demo(args.out, args.budget, args.steps, args.batch_size, args.device, args.prompt, lr=args.lr)
    return 130 if out.get("interrupted") else 0

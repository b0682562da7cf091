"""`gpt2-fast train` (also `python -m gpt2_fast.train`, and under torchrun for DDP / FSDP2).

    gpt2-fast train gpt2 --data=out/data --batch_size=8 --seq_len=1024 --max_steps=5000
    gpt2-fast train my_run.toml --lr=3e-4                 # a TOML/JSON file of TrainConfig fields
    torchrun --nproc_per_node=8 -m gpt2_fast.train gpt2 --grad_accum=4
    gpt2-fast train --resume=auto --out_dir=out/train    # continue the latest checkpoint exactly

One optimizer step: grad_accum micro-batches of (batch_size, seq_len) per process, each through
the fused LM-head + cross-entropy path `model(x, y, return_logits=False)` (the (B*T, vocab)
logits never exist), gradients synchronised once (DDP no_sync / FSDP2 requires_gradient_sync on
the last micro-step only), clipped, then AdamW (fused on CUDA; weight decay on 2-D weights only)
at the warmup + cosine learning rate. bf16 autocast on CUDA, fp32 on CPU.

Determinism: on CPU a run stopped at step k and resumed from its checkpoint ends with weights
bit-identical to an uninterrupted run: the checkpoint holds the model, the optimizer, every
generator state and the data position, and nothing else in the loop draws random numbers
(samples use their own seeded generator).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import typing
from typing import Any, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointManager, load_checkpoint, model_from_state, rng_state, set_rng_state
from .config import RUN_CONTROL_FIELDS, GPTConfig, TrainConfig
from .data import TokenLoader

# bf16 dense tensor-core peaks (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------------
# configuration: preset / file / --key=value, types checked
# ---------------------------------------------------------------------------------------------

def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, tp) -> Any:
    """value for TrainConfig.<name> of annotation tp; ints are accepted for floats."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, tp))
    if not ok:
        raise TypeError(f"TrainConfig.{name} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _parse_str(name: str, text: str, tp) -> Any:
    """A --key=value string converted to the field's type."""
    args = typing.get_args(tp)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ValueError(f"--{name} expects {tp.__name__}, got {text!r}") from None
    return text


def read_config_file(path: str) -> dict:
    """A TOML or JSON file of TrainConfig fields (a [train] table in TOML is also accepted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        with open(path, "rb") as f:
            d = tomllib.load(f)
        d = d.get("train", d)
    elif path.endswith(".json"):
        with open(path) as f:
            d = json.load(f)
    else:
        raise ValueError(f"config file {path} must end in .toml or .json")
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table of TrainConfig fields")
    return d


def build_config(base: Optional[str] = None, overrides: Optional[dict] = None, **kw) -> TrainConfig:
    """TrainConfig from a preset name or a .toml/.json file, then `overrides` ({field: str}
    from the command line, parsed by type) and `kw` (typed values)."""
    types = _field_types()
    values: dict = {}
    if base:
        if base.endswith((".toml", ".json")):
            values.update(read_config_file(base))
        else:
            values["model"] = base
    for k, v in (overrides or {}).items():
        if k not in types:
            raise ValueError(f"unknown TrainConfig field {k!r}")
        values[k] = _parse_str(k, v, types[k])
    values.update(kw)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}; expected some of {sorted(types)}")
    return TrainConfig(**{k: _check_type(k, v, types[k]) for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# pieces of the loop
# ---------------------------------------------------------------------------------------------

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L C T (PaLM appendix B)."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device, bf16: bool) -> Optional[float]:
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """torchrun's environment -> an initialised process group (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def _all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


@torch.no_grad()
def evaluate(model: nn.Module, loader: TokenLoader, iters: int, autocast, d: Dist) -> float:
    """Mean loss over the first `iters` batches of `loader` (from its start, so it is the same
    set each time), averaged over ranks."""
    was_training = model.training
    model.eval()
    loader.reset()
    n = max(1, min(iters, loader.batches_per_epoch()))
    total = torch.zeros((), device=loader.device)
    for _ in range(n):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x, y, return_logits=False)
        total += loss.float()
    model.train(was_training)
    return float(_all_reduce_mean(total / n, d))


def sample_text(raw: nn.Module, cfg: TrainConfig, step: int) -> str:
    """A short continuation of cfg.sample_prompt from the unwrapped model (own seeded generator)."""
    from .generate import generate
    from .tokenizer import get_tokenizer
    tok = get_tokenizer()
    n_prompt = max(1, len(tok.encode(cfg.sample_prompt)))
    n_new = max(0, min(cfg.sample_tokens, raw.config.block_size - n_prompt))
    was_training = raw.training
    raw.eval()
    try:
        out = generate(raw, cfg.sample_prompt, tokenizer=tok, max_new_tokens=n_new, temperature=0.8,
                       top_k=200, seed=cfg.seed + step)
    finally:
        raw.clear_cache()
        raw.train(was_training)
    return cfg.sample_prompt + out.texts[0]


class _Logger:
    """JSONL (rank 0), plus TensorBoard when it is installed."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.f = open(os.path.join(out_dir, "log.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


class _StopSignal:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and stops."""

    def __init__(self):
        self.signum = 0
        self.old = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\ngpt2-fast train: got {signal.Signals(signum).name}; writing a checkpoint after "
              f"this step (press again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _config_mismatch(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != now[k]]


def _build_model(cfg: TrainConfig, resume_state: Optional[dict]):
    if resume_state is not None:
        return model_from_state(resume_state)
    if cfg.init_from == "scratch":
        from .model import GPT
        return GPT(cfg.model_config())
    if cfg.init_from.endswith(".pt"):
        state = load_checkpoint(cfg.init_from)
        mc = dict(state["model_config"], dropout=cfg.dropout, backend=cfg.backend)
        return model_from_state(dict(state, model_config=mc))
    if os.path.isdir(cfg.init_from):
        from .model import GPT
        return GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout, backend=cfg.backend)
    raise ValueError(f"init_from must be 'scratch', an HF checkpoint directory or a .pt checkpoint; "
                     f"got {cfg.init_from!r}")


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as cfg says; returns a summary dict (final losses, checkpoint,
    steps done, the history of logged losses, `interrupted` = signal number or 0)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = init_distributed(device.type)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    if cfg.fsdp and not d.enabled:
        raise ValueError("fsdp=true needs several processes: launch with torchrun --nproc_per_node=N")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    use_autocast = bf16 and not cfg.fsdp  # FSDP2 casts parameters itself (MixedPrecisionPolicy)

    def autocast():
        if use_autocast:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- resume / init ---------------------------------------------------------------------
    ckpts = CheckpointManager(cfg.out_dir, cfg.keep_last)
    resume_state = None
    if cfg.resume:
        path = ckpts.latest() if cfg.resume == "auto" else cfg.resume
        if path is None:
            if d.master:
                print(f"gpt2-fast train: resume=auto but no checkpoint in {cfg.out_dir}; starting fresh",
                      file=sys.stderr)
        else:
            resume_state = load_checkpoint(path)
            diff = _config_mismatch(resume_state.get("train_config", {}), cfg)
            if diff:
                raise ValueError(f"cannot resume {path} with a different configuration ("
                                 + "; ".join(diff) + "); use the checkpoint's settings, or start a new "
                                 "run (fine-tune from it with init_from=" + path + ")")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 shards them as they are)
    model = _build_model(cfg, resume_state)
    torch.manual_seed(cfg.seed + d.rank)  # then per-rank streams (dropout)
    mc = model.config
    if cfg.block_size is not None and cfg.block_size > mc.block_size:
        raise ValueError(f"block_size {cfg.block_size} is larger than the model's block_size {mc.block_size}")
    if cfg.seq_len > mc.block_size:
        raise ValueError(f"seq_len {cfg.seq_len} is larger than the model's block_size {mc.block_size}; "
                         f"use --seq_len <= {mc.block_size}")
    model.to(device)
    raw = model
    n_params = raw.num_params()

    # -- data ------------------------------------------------------------------------------
    train_loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, cfg.data_order, cfg.seed,
                               d.rank, d.world_size, device)
    val_loader = None
    if cfg.eval_interval or cfg.eval_iters:
        try:
            val_loader = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, "sequential", cfg.seed,
                                     d.rank, d.world_size, device)
        except FileNotFoundError:
            val_loader = None  # a folder prepared with val_fraction=0

    # -- wrap: FSDP2 / compile / DDP ---------------------------------------------------------
    if cfg.fsdp:
        fully_shard, MixedPrecisionPolicy = _fsdp_api()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in raw.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    optimizer = make_optimizer(raw, cfg, fused=device.type == "cuda" and not cfg.fsdp)
    start_step = 0
    if resume_state is not None:
        start_step = int(resume_state["step"])
        _load_optimizer(raw, optimizer, resume_state["optimizer"], cfg.fsdp)
        train_loader.load_state_dict(resume_state["data"])
    fwd = torch.compile(raw) if cfg.compile else raw
    if d.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if resume_state is not None:
        rngs = resume_state["rng"]
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank])
        elif d.master:
            print(f"gpt2-fast train: checkpoint has RNG states of {len(rngs)} ranks, this run has "
                  f"{d.world_size}; generators are reseeded", file=sys.stderr)

    # -- loop ------------------------------------------------------------------------------
    log = _Logger(cfg.out_dir, d.master, cfg.tensorboard)
    if d.master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": cfg.to_dict(), "model": mc.to_dict()}, f, indent=1)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    fpt = flops_per_token(mc, n_params, cfg.seq_len)
    peak = peak_flops(device, bf16)
    metrics = dict(resume_state.get("metrics", {})) if resume_state else {}
    history: list[dict] = []
    bar = None
    if d.master and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    if d.master:
        print(f"gpt2-fast train: {mc.n_layer} layers x {mc.n_embd}, {n_params / 1e6:.1f}M params, "
              f"{device}{' bf16' if bf16 else ' fp32'}, {d.world_size} process(es), "
              f"{tokens_per_step:,} tokens/step, {train_loader.n_tokens:,} train tokens, steps "
              f"{start_step}..{cfg.max_steps}", file=sys.stderr)

    step = start_step
    last_saved = start_step if resume_state is not None else -1
    stop_at = cfg.max_steps if not cfg.max_steps_this_run else min(cfg.max_steps, start_step + cfg.max_steps_this_run)

    def save() -> str:
        nonlocal last_saved
        state = _gather_state(raw, optimizer, cfg, train_loader, step, metrics, d)
        path = ckpts.save(step, state) if d.master else ""
        last_saved = step
        if d.enabled:
            import torch.distributed as dist
            dist.barrier()
        return path

    def run_eval() -> None:
        if val_loader is None:
            return
        metrics["val_loss"] = evaluate(fwd if not d.enabled else raw, val_loader, cfg.eval_iters, autocast, d)
        rec = {"kind": "eval", "step": step, "val_loss": metrics["val_loss"],
               "val_ppl": math.exp(min(metrics["val_loss"], 50.0))}
        history.append(rec)
        log.log(rec)

    ckpt_path = None
    fwd.train()
    t_last = t_loop = time.perf_counter()
    out_of_time = False
    with _StopSignal() as stop:
        while step < stop_at:
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                x, y = train_loader.next_batch()
                if cfg.fsdp:
                    raw.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext()
                elif d.enabled and not last:
                    sync = fwd.no_sync()
                else:
                    sync = contextlib.nullcontext()
                with sync:
                    with autocast():
                        _, loss = fwd(x, y, return_logits=False)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_loss = float(_all_reduce_mean(loss_sum / cfg.grad_accum, d))
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = tokens_per_step / dt
            mfu = fpt * tok_s / d.world_size / peak if peak else None
            metrics.update(train_loss=train_loss, tokens=metrics.get("tokens", 0) + tokens_per_step)
            rec = {"kind": "train", "step": step, "loss": train_loss, "lr": lr, "tok_s": round(tok_s, 1),
                   "step_ms": round(dt * 1e3, 2)}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            if mfu is not None:
                rec["mfu"] = round(mfu, 4)
            history.append(rec)
            if step % cfg.log_interval == 0 or step == stop_at or step == start_step + 1:
                log.log(rec)
            if bar is not None:
                post = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                if "val_loss" in metrics:
                    post["val"] = f"{metrics['val_loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.max_steps:
                run_eval()
            if cfg.sample_interval and step % cfg.sample_interval == 0 and d.master and not cfg.fsdp:
                text = sample_text(raw, cfg, step)
                log.log({"kind": "sample", "step": step, "text": text})
                (bar.write if bar is not None else print)(f"[step {step} sample] {text!r}")
            # stop on a signal or at the time budget; under DDP every rank must agree
            signum = stop.signum
            out_of_time = bool(cfg.max_seconds) and time.perf_counter() - t_loop > cfg.max_seconds
            if d.enabled:
                flags = torch.tensor([float(signum), float(out_of_time)], device=device)
                import torch.distributed as dist
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                signum, out_of_time = int(flags[0]), bool(flags[1])
            if signum:
                ckpt_path = save()
                if bar is not None:
                    bar.close()
                    bar = None
                if d.master:
                    print(f"gpt2-fast train: stopped by {signal.Signals(signum).name} at step {step}; "
                          f"checkpoint {ckpt_path}; continue with --resume=auto", file=sys.stderr)
                log.close()
                return {"step": step, "train_loss": metrics.get("train_loss"), "val_loss": metrics.get("val_loss"),
                        "checkpoint": ckpt_path, "history": history, "interrupted": signum}
            if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < stop_at:
                ckpt_path = save()
            if out_of_time and step < stop_at:
                if d.master:
                    (bar.write if bar is not None else print)(
                        f"gpt2-fast train: time budget of {cfg.max_seconds:.0f} s reached at step {step}")
                break
            out_of_time = False
            t_last = time.perf_counter()  # tokens/s counts the steps, not evals / samples / saves
    if bar is not None:
        bar.close()
    if step >= cfg.max_steps or out_of_time:
        run_eval()
    if last_saved != step:
        ckpt_path = save()
    elif ckpt_path is None and d.master:
        ckpt_path = ckpts.latest()
    log.close()
    if d.master and cfg.plot:
        from .plots import plot_loss_curve
        png = plot_loss_curve(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "loss.png"))
        if png:
            metrics["plot"] = png
    return {"step": step, "train_loss": metrics.get("train_loss"), "val_loss": metrics.get("val_loss"),
            "checkpoint": ckpt_path, "history": history, "interrupted": 0, "plot": metrics.get("plot"),
            "n_params": n_params}


def _gather_state(raw, optimizer, cfg, loader, step, metrics, d: Dist) -> dict:
    """Everything a checkpoint holds (full state dicts; collective under DDP / FSDP)."""
    rngs = [rng_state()]
    if d.enabled:
        import torch.distributed as dist
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(raw, options=opts)
        opt_sd = get_optimizer_state_dict(raw, optimizer, options=opts)
    else:
        model_sd = {k: v.detach().to("cpu") for k, v in raw.state_dict().items()}
        opt_sd = optimizer.state_dict()
    return {"model_config": raw.config.to_dict(), "train_config": cfg.to_dict(), "model": model_sd,
            "optimizer": opt_sd, "rng": rngs, "data": loader.state_dict(), "metrics": dict(metrics)}


def _load_optimizer(raw, optimizer, sd, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", default=None,
                   help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a .toml/.json file of "
                        "TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        bool_flag = f.type in (bool, "bool")
        p.add_argument(*names, dest=f.name, default=None, metavar="V",
                       nargs="?" if bool_flag else None, const="true" if bool_flag else None,
                       help=f"(default {f.default!r})")


def config_from_args(args) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return build_config(args.base, {k: getattr(args, k) for k in names if getattr(args, k, None) is not None})


def run(args) -> int:
    cfg = config_from_args(args)
    out = train(cfg)
    if out.get("checkpoint"):
        vl = f", val loss {out['val_loss']:.4f}" if out.get("val_loss") is not None else ""
        print(f"gpt2-fast train: step {out['step']}, train loss {out['train_loss']:.4f}{vl}; "
              f"checkpoint {out['checkpoint']}", file=sys.stderr)
    _finish_distributed()
    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(out["interrupted"], 0)


def _finish_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2_fast.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"gpt2_fast.train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

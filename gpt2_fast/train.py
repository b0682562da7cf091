"""`gpt2-fast train` (also `python -m gpt2_fast.train`, and under torchrun for DDP / FSDP2).

    gpt2-fast train gpt2 --data=out/data --out=out/run1 --batch_size=8 --max_steps=5000
    gpt2-fast train my_run.toml --lr=3e-4                 # a TOML/JSON file of TrainConfig fields
    torchrun --nproc_per_node=8 -m gpt2_fast.train gpt2 --total_batch_size=524288
    gpt2-fast train --resume=auto --out=out/run1          # continue the latest checkpoint exactly

The parts: train_args (config and options), train_resume (run folder, resume checks), schedule
(learning rate), distributed (torchrun), train_log (log.jsonl / TensorBoard / wandb), run_dir
and checkpoint (files); here the Trainer: set-up, train_step, run_eval, save, and the loop.

One optimizer step: accum micro-batches of (batch_size, seq_len) per process, each through
the fused LM-head + cross-entropy path `model(x, y, return_logits=False)` (the (B*T, vocab)
logits never exist), gradients synchronised once (DDP no_sync / FSDP2 requires_gradient_sync on
the last micro-step only), clipped, then AdamW (fused; weight decay on 2-D weights only)
at the warmup + cosine learning rate. bf16 autocast on CUDA, fp32 on CPU (TF32 matmuls for
fp32 on CUDA). The loss stays on the device; the host reads it every log_interval steps only.

Determinism: on CPU a run stopped at step k and resumed from its checkpoint ends with weights
bit-identical to an uninterrupted run: the checkpoint holds the model, the optimizer, every
generator state and the data position, and nothing else in the loop draws random numbers
(samples use their own seeded generator).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

from . import run_dir
from .checkpoint import CheckpointManager, model_from_state, model_state_dict, rng_state, set_rng_state
from .config import GPTConfig, TrainConfig
from .data import TokenLoader, read_shard, shard_paths
from .devices import parse_device
from .distributed import Dist, all_reduce_mean, finish_distributed, fsdp_api, init_distributed
from .run_dir import RunLock
from .schedule import lr_at, schedule_anchor
from .train_args import add_arguments, build_config, config_from_args  # noqa: F401 (the CLI's entry points)
from .train_log import TrainLogger
from .train_resume import open_run_dir, resume_mismatch

# bf16 dense tensor-core peaks (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------------
# pieces of the loop
# ---------------------------------------------------------------------------------------------

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


def eval_batches(loader: TokenLoader, iters: int) -> int:
    """Global batches one evaluation reads: `iters`, at most an epoch; 0: the whole split."""
    return loader.batches_per_epoch() if iters == 0 else max(1, min(iters, loader.batches_per_epoch()))


@torch.no_grad()
def evaluate(model: nn.Module, loader: TokenLoader, iters: int, autocast, d: Dist) -> float:
    """Mean loss over the first `iters` batches of `loader` (0: all of them; from its start, so it
    is the same set each time), averaged over ranks."""
    was_training = model.training
    model.eval()
    loader.reset()
    n = eval_batches(loader, iters)
    total = torch.zeros((), device=loader.device)
    for _ in range(n):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x, y, return_logits=False)
        total += loss.float()
    model.train(was_training)
    return float(all_reduce_mean(total / n, d))


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


# ---------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------

def _build_model(cfg: TrainConfig, resume_state: Optional[dict]):
    if resume_state is not None:
        return model_from_state(resume_state)
    if cfg.init_from == "scratch":
        from .model import GPT
        return GPT(cfg.model_config())
    from .load import load_model  # an HF folder, a .pt checkpoint, a training folder, a preset
    try:
        return load_model(cfg.init_from, dropout=cfg.dropout, backend=cfg.backend).train()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init_from: {e}; or 'scratch' for random weights") from None


class Trainer:
    """One training run: set-up (__init__), step, eval, checkpoint; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = parse_device(cfg.device)
        self.d = d = init_distributed(self.device.type)
        if d.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", d.local_rank)
        if cfg.fsdp and not d.enabled:
            raise ValueError("fsdp=true needs several processes: launch with torchrun --nproc_per_node=N")
        self.accum = cfg.accum_steps(d.world_size)
        self.tokens_per_step = cfg.tokens_per_step(d.world_size)
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.use_autocast = self.bf16 and not cfg.fsdp  # FSDP2 casts parameters itself (MixedPrecisionPolicy)
        if self.device.type == "cuda" and not self.bf16:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: TF32 tensor-core matmuls
            torch.backends.cudnn.allow_tf32 = True
        self.lock = RunLock(cfg.out_dir)
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def autocast(self):
        if self.use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _setup(self) -> None:
        cfg, d = self.cfg, self.d
        path, state = open_run_dir(cfg, d, self.lock)
        self.resumed_from = path
        self.start_step = int(state["step"]) if state else 0
        self.metrics = dict(state.get("metrics", {})) if state else {}
        if state is not None:
            saved = state.get("train_config", {})
            diff = resume_mismatch(saved, int(state.get("world_size", len(state.get("rng", [0])))), cfg,
                                   d.world_size)
            if diff:
                raise ValueError(f"cannot resume {path} with a different configuration (" + "; ".join(diff)
                                 + "); use the checkpoint's settings, or start a new run (fine-tune from it "
                                 "with init_from=" + path + ")")
            anchor = schedule_anchor(saved, self.metrics, self.start_step, cfg)
            self.metrics.pop("lr_anchor", None)
            if anchor is not None:
                self.metrics["lr_anchor"] = anchor
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 shards them as they are)
        self.raw = raw = _build_model(cfg, state)
        torch.manual_seed(cfg.seed + d.rank)  # then per-rank streams (dropout)
        mc = raw.config
        if cfg.block_size is not None and cfg.block_size > mc.block_size:
            raise ValueError(f"block_size {cfg.block_size} is larger than the model's block_size {mc.block_size}")
        if cfg.seq_len > mc.block_size:
            raise ValueError(f"seq_len {cfg.seq_len} is larger than the model's block_size {mc.block_size}; "
                             f"use --seq_len <= {mc.block_size}")
        raw.grad_checkpointing = cfg.grad_checkpointing
        raw.to(self.device)
        self.n_params = raw.num_params()
        self._setup_data()
        self._setup_wrappers(state)
        self._setup_outputs(path, state)

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.d
        self.train_loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, cfg.data_order,
                                        cfg.seed, d.rank, d.world_size, self.device)
        self.val_loader = None
        if not cfg.eval_interval:
            return  # no evaluation: no val split needed
        try:
            n_val = sum(read_shard(p).size for p in shard_paths(cfg.data, "val"))
        except FileNotFoundError:
            n_val = 0
        if n_val == 0:
            if d.master:
                print(f"gpt2-fast train: {cfg.data} has no validation tokens (0-token val split); training "
                      f"without evaluation (prepare with --val-fraction > 0 to evaluate)", file=sys.stderr)
            return
        try:
            self.val_loader = TokenLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, "sequential",
                                          cfg.seed, d.rank, d.world_size, self.device)
        except ValueError as e:
            raise ValueError(f"{e}; or train without evaluation with --eval_interval=0") from None

    def _setup_wrappers(self, state: Optional[dict]) -> None:
        cfg, d, raw = self.cfg, self.d, self.raw
        if cfg.fsdp:
            fully_shard, MixedPrecisionPolicy = fsdp_api()
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
                else MixedPrecisionPolicy()
            for block in raw.transformer.h:
                fully_shard(block, mp_policy=mp)
            fully_shard(raw, mp_policy=mp)
        self.optimizer = make_optimizer(raw, cfg, fused=self.device.type in ("cuda", "cpu") and not cfg.fsdp)
        if state is not None:
            _load_optimizer(raw, self.optimizer, state["optimizer"], cfg.fsdp)
            self.train_loader.load_state_dict(state["data"])
        fwd = torch.compile(raw) if cfg.compile else raw
        if d.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd = DDP(fwd, device_ids=[d.local_rank] if self.device.type == "cuda" else None)
        self.fwd = fwd
        if state is not None:
            rngs = state["rng"]
            if len(rngs) == d.world_size:
                set_rng_state(rngs[d.rank])
            elif d.master:
                print(f"gpt2-fast train: checkpoint has RNG states of {len(rngs)} ranks, this run has "
                      f"{d.world_size}; generators are reseeded", file=sys.stderr)

    def _setup_outputs(self, path: Optional[str], state: Optional[dict]) -> None:
        cfg, d, mc = self.cfg, self.d, self.raw.config
        self.ckpts = CheckpointManager(cfg.out_dir, cfg.keep_last)
        if d.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            dropped = run_dir.truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), self.start_step)
            if dropped and path:
                print(f"gpt2-fast train: log.jsonl: dropped {dropped} record(s) past step {self.start_step} "
                      f"(written after {os.path.basename(path)})", file=sys.stderr)
            run_dir.write_json(os.path.join(cfg.out_dir, "config.json"),
                               {"train": cfg.to_dict(), "model": mc.to_dict(), "world_size": d.world_size})
        self.log = TrainLogger(cfg.out_dir, d.master, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                               cfg.wandb_run_name, {"train": cfg.to_dict(), "model": mc.to_dict()})
        if path:
            self.log.log({"kind": "resume", "step": self.start_step, "from": path})
        self.fpt = flops_per_token(mc, self.n_params, cfg.seq_len)
        self.peak = peak_flops(self.device, self.bf16)
        self.history: list[dict] = []
        self.seconds, self.val_tokens = 0.0, 0
        self.step = self.start_step
        self.last_saved = self.start_step if state is not None else -1
        self.stop_at = cfg.max_steps if not cfg.max_steps_this_run else \
            min(cfg.max_steps, self.start_step + cfg.max_steps_this_run)
        if d.master:
            tf32 = " (TF32 matmuls)" if self.device.type == "cuda" and not self.bf16 else ""
            print(f"gpt2-fast train: {mc.n_layer} layers x {mc.n_embd}, {self.n_params / 1e6:.1f}M params, "
                  f"{self.device}{' bf16' if self.bf16 else ' fp32'}{tf32}, {d.world_size} process(es), "
                  f"{self.tokens_per_step:,} tokens/step ({cfg.batch_size} x {cfg.seq_len} x {self.accum} accum "
                  f"x {d.world_size}), {self.train_loader.n_tokens:,} train tokens, steps "
                  f"{self.start_step}..{cfg.max_steps}", file=sys.stderr)
            if self.accum >= 256:
                print(f"gpt2-fast train: note: {self.accum:,} micro-batches per optimizer step (total_batch_size "
                      f"{cfg.total_batch_size:,}); for a quick run lower --total_batch_size", file=sys.stderr)

    # -- one optimizer step ------------------------------------------------------------------

    def train_step(self, lr: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """accum micro-batches, one optimizer step. Returns (mean loss, grad norm) as device
        tensors: nothing here waits for the device."""
        cfg, d, fwd = self.cfg, self.d, self.fwd
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            last = micro == self.accum - 1
            x, y = self.train_loader.next_batch()
            if cfg.fsdp:
                self.raw.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            elif d.enabled and not last:
                sync = fwd.no_sync()
            else:
                sync = contextlib.nullcontext()
            with sync:
                with self.autocast():
                    _, loss = fwd(x, y, return_logits=False)
                (loss / self.accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum, grad_norm

    # -- eval and checkpoints -----------------------------------------------------------------

    def run_eval(self) -> None:
        if self.val_loader is None:
            return
        model = self.fwd if not self.d.enabled else self.raw
        val = evaluate(model, self.val_loader, self.cfg.eval_iters, self.autocast, self.d)
        self.metrics["val_loss"] = val
        self.val_tokens = eval_batches(self.val_loader, self.cfg.eval_iters) * self.d.world_size * \
            self.cfg.batch_size * self.cfg.seq_len
        rec = {"kind": "eval", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        self.history.append(rec)
        self.log.log(rec)
        if self.cfg.keep_best and val < self.metrics.get("best_val_loss", float("inf")):
            self.metrics["best_val_loss"] = val
            self.metrics["best_step"] = self.step
            state = _gather_state(self.raw, None, self.cfg, self.train_loader, self.step, self.metrics, self.d)
            if self.d.master:
                self.ckpts.save_best(self.step, state)
            self._barrier()

    def save(self) -> str:
        state = _gather_state(self.raw, self.optimizer, self.cfg, self.train_loader, self.step, self.metrics,
                              self.d)
        path = self.ckpts.save(self.step, state) if self.d.master else ""
        self.last_saved = self.step
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.d.enabled:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        self.log.close()
        self.lock.release()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to stop_at (or a signal / the time budget); returns the summary dict."""
        cfg, d = self.cfg, self.d
        bar = _progress_bar(cfg, d, self.start_step)
        meter = _Meter()
        t_loop = time.perf_counter()
        out_of_time, signum, ckpt_path = False, 0, None
        self.fwd.train()
        with _StopSignal() as stop:
            while self.step < self.stop_at:
                elapsed = time.perf_counter() - t_loop
                lr = lr_at(cfg, self.step, self.metrics.get("lr_anchor"), elapsed)
                loss, grad_norm = self.train_step(lr)
                self.step += 1
                self.metrics["tokens"] = self.metrics.get("tokens", 0) + self.tokens_per_step
                meter.steps += 1
                at_log = self.step % cfg.log_interval == 0 or self.step == self.stop_at \
                    or self.step == self.start_step + 1
                if at_log:  # the one place a step waits for the device
                    self._log_step(loss, grad_norm, lr, meter, bar)
                if bar is not None:
                    bar.update(1)
                meter.pause()
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.max_steps:
                    self.run_eval()
                if cfg.sample_interval and self.step % cfg.sample_interval == 0 and d.master and not cfg.fsdp:
                    text = sample_text(self.raw, cfg, self.step)
                    self.log.log({"kind": "sample", "step": self.step, "text": text})
                    (bar.write if bar is not None else print)(f"[step {self.step} sample] {text!r}")
                # stop on a signal or at the time budget; under DDP every rank must agree (checked
                # at log steps only, where the ranks sync anyway)
                signum = stop.signum
                out_of_time = bool(cfg.max_seconds) and time.perf_counter() - t_loop > cfg.max_seconds
                if d.enabled:
                    signum, out_of_time = self._agree(signum, out_of_time) if at_log else (0, False)
                if signum:
                    break
                if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < self.stop_at:
                    ckpt_path = self.save()
                if out_of_time and self.step < self.stop_at:
                    if d.master:
                        (bar.write if bar is not None else print)(
                            f"gpt2-fast train: time budget of {cfg.max_seconds:.0f} s reached at step {self.step}")
                    break
                out_of_time = False
                meter.resume()  # tokens/s counts the steps, not evals / samples / saves
        if bar is not None:
            bar.close()
        self.seconds = time.perf_counter() - t_loop
        return self._finish(signum, out_of_time, ckpt_path)

    def _log_step(self, loss: torch.Tensor, grad_norm, lr: float, meter: "_Meter", bar) -> None:
        train_loss = float(all_reduce_mean(loss, self.d))
        steps, seconds = meter.read()
        tok_s = self.tokens_per_step * steps / max(seconds, 1e-9)
        self.metrics["train_loss"] = train_loss
        rec = {"kind": "train", "step": self.step, "loss": train_loss, "lr": lr, "tok_s": round(tok_s, 1),
               "step_ms": round(1e3 * seconds / max(steps, 1), 2)}
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        mfu = self.fpt * tok_s / self.d.world_size / self.peak if self.peak else None
        if mfu is not None:
            rec["mfu"] = round(mfu, 4)
        self.history.append(rec)
        self.log.log(rec)
        if bar is not None:
            post = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            if "val_loss" in self.metrics:
                post["val"] = f"{self.metrics['val_loss']:.3f}"
            bar.set_postfix(post, refresh=False)

    def _agree(self, signum: int, out_of_time: bool) -> tuple[int, bool]:
        import torch.distributed as dist
        flags = torch.tensor([float(signum), float(out_of_time)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _finish(self, signum: int, out_of_time: bool, ckpt_path: Optional[str]) -> dict:
        cfg, d = self.cfg, self.d
        if signum:
            ckpt_path = self.save()
            if d.master:
                print(f"gpt2-fast train: stopped by {signal.Signals(signum).name} at step {self.step}; "
                      f"checkpoint {ckpt_path}; continue with --resume=auto", file=sys.stderr)
            return self._summary(ckpt_path, signum)
        if self.step >= cfg.max_steps or out_of_time:
            self.run_eval()
        if self.last_saved != self.step:
            ckpt_path = self.save()
        elif d.master and ckpt_path is None:  # nothing to train: the checkpoint resumed from
            ckpt_path = self.resumed_from
        self.log.close()
        if d.master and cfg.plot:
            from .plots import plot_loss_curve
            png = plot_loss_curve(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "loss.png"))
            if png:
                self.metrics["plot"] = png
        return self._summary(ckpt_path, 0)

    def _summary(self, ckpt_path: Optional[str], signum: int) -> dict:
        m = self.metrics
        return {"step": self.step, "train_loss": m.get("train_loss"), "val_loss": m.get("val_loss"),
                "checkpoint": ckpt_path, "history": self.history, "interrupted": signum, "plot": m.get("plot"),
                "n_params": self.n_params, "best_val_loss": m.get("best_val_loss"),
                "tokens_per_step": self.tokens_per_step, "seconds": self.seconds,
                "tokens": (self.step - self.start_step) * self.tokens_per_step, "val_tokens": self.val_tokens}


class _Meter:
    """Training seconds and steps since the last log record (evals, samples, saves excluded)."""

    def __init__(self):
        self.steps, self.seconds, self.t = 0, 0.0, time.perf_counter()

    def pause(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self.t
        self.t = now

    def resume(self) -> None:
        self.t = time.perf_counter()

    def read(self) -> tuple[int, float]:
        self.pause()
        out = (self.steps, self.seconds)
        self.steps, self.seconds = 0, 0.0
        return out


def _progress_bar(cfg: TrainConfig, d: Dist, start: int):
    if not (d.master and cfg.progress):
        return None
    from tqdm.auto import tqdm
    total = None if cfg.time_schedule else cfg.max_steps  # a time budget: the clock, not max_steps, ends it
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as cfg says; returns a summary dict (final losses, checkpoint,
    steps done, the history of logged losses, `interrupted` = signal number or 0)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _gather_state(raw, optimizer, cfg, loader, step, metrics, d: Dist) -> dict:
    """Everything a checkpoint holds (full state dicts; collective under DDP / FSDP). optimizer
    None: the weights only (best.pt)."""
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
        if raw.config.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
        opt_sd = get_optimizer_state_dict(raw, optimizer, options=opts) if optimizer is not None else None
    else:
        model_sd = model_state_dict(raw)
        opt_sd = optimizer.state_dict() if optimizer is not None else None
    return {"model_config": raw.config.to_dict(), "train_config": cfg.to_dict(), "model": model_sd,
            "optimizer": opt_sd, "rng": rngs, "data": loader.state_dict(), "metrics": dict(metrics),
            "world_size": d.world_size}


def _load_optimizer(raw, optimizer, sd, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def run(args) -> int:
    cfg = config_from_args(args)
    out = train(cfg)
    if out.get("checkpoint"):
        vl = f", val loss {out['val_loss']:.4f}" if out.get("val_loss") is not None else ""
        print(f"gpt2-fast train: step {out['step']}, train loss {out['train_loss']:.4f}{vl}; "
              f"checkpoint {out['checkpoint']}", file=sys.stderr)
    finish_distributed()
    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(out["interrupted"], 0)


def main(argv=None) -> int:
    from .cli import USER_ERRORS, error_line
    p = argparse.ArgumentParser(prog="gpt2-fast train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        if os.environ.get("GPT2_FAST_DEBUG") == "1":
            raise
        print(error_line("train", e), file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1


if __name__ == "__main__":
    raise SystemExit(main())


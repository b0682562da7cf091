"""Kernel launches per decode step, counted on any device: `gpt2-fast bench decode --count-ops`.

At batch 1 a decode step is launch-bound long before it is bandwidth-bound (inside a CUDA graph
each dependent small kernel still costs ~1.5-2.5 us on an H100), so the number of kernels a step
launches is the budget. It is counted here without a GPU, as a proxy for the launches a captured
graph holds:

  torch ops   every op the step dispatches (a TorchDispatchMode), except views (`is_view`),
              allocations (empty*, new_empty*) and no-ops (detach, alias, lift_fresh): one launch
              each. A custom op of the Triton backend (namespace gpt2_fast_triton) is not counted
              itself; the Triton kernels it launches are (decode_attention = split + combine).
  Triton      every @triton.jit kernel launched, compiled or interpreted (TRITON_INTERPRET=1 on
              CPU, where a Triton launch is no torch op), counted by wrapping JITFunction.run and
              InterpretedFunction.run while counting. Warm the step up first: autotuning runs a
              kernel once per config.
  host reads  aten._local_scalar_dense / is_nonzero (item(), int(), bool() of a tensor): a host
              sync, which a CUDA-graph step must not have. Reported apart, not as launches.

Per layer and fixed: the same step is counted with the model's block list cut to 1 and to 2 blocks
(per layer = n2 - n1, fixed = n1 - per layer) and at full depth (checked: fixed + L x per layer).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TRITON_NAMESPACE = "gpt2_fast_triton"
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
NO_OPS = {"detach", "detach_", "alias", "lift_fresh", "_unsafe_view", "set_", "resize_",
          "promote_types", "result_type", "size", "stride", "sym_size", "sym_stride", "is_same_size"}
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal"}

SAMPLING = {  # the sampling configurations the benchmark and the test count
    "greedy": dict(temperature=0.0),
    "sample": dict(temperature=0.8, top_k=40, top_p=0.9, seed=0),
}


@dataclass
class OpCounts:
    launches: Counter = field(default_factory=Counter)    # op or kernel name -> launches
    host_reads: Counter = field(default_factory=Counter)  # op name -> calls
    in_triton: int = 0                                    # > 0 while a Triton launch runs

    @property
    def total(self) -> int:
        return sum(self.launches.values())


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        namespace = func.namespace
        if self.counts.in_triton:
            pass  # the interpreter's own copies of a kernel's arguments
        elif name == "dropout" and (not args[2] or args[1] == 0):
            pass  # eval-mode / p = 0 dropout returns its input
        elif name in HOST_READS and namespace == "aten":
            self.counts.host_reads[name] += 1
        elif namespace == TRITON_NAMESPACE:
            pass  # its Triton kernels are counted at their launch
        elif not (getattr(func, "is_view", False) or name in ALLOCATIONS or name in NO_OPS):
            self.counts.launches[f"{namespace}.{name}" if namespace != "aten" else name] += 1
        return func(*args, **(kwargs or {}))


def _launcher_classes() -> list:
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except Exception:
        pass
    return classes


@contextlib.contextmanager
def _count_triton(counts: OpCounts) -> Iterator[None]:
    """Count every Triton kernel launch (fn[grid](...) and launches through wrap_triton)."""
    saved = [(cls, cls.run) for cls in _launcher_classes()]

    def wrap(original):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counts.launches[f"triton.{getattr(self.fn, '__name__', '?')}"] += 1
            counts.in_triton += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts.in_triton -= 1
        return run
    try:
        for cls, original in saved:
            cls.run = wrap(original)
        yield
    finally:
        for cls, original in saved:
            cls.run = original


@contextlib.contextmanager
def counting() -> Iterator[OpCounts]:
    """`with counting() as c: ...` -> c.launches, c.host_reads of what ran inside."""
    counts = OpCounts()
    with _count_triton(counts), _DispatchCounter(counts):
        yield counts


# ---------------------------------------------------------------------------------------------
# one engine step
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _depth(model, n: Optional[int]) -> Iterator[None]:
    """The model with its first n blocks only (n > L repeats block 0; counting only). Its KV
    caches are dropped before and after (the engine allocates them for the blocks it sees)."""
    h = model.transformer.h
    if n is not None:
        model.clear_cache()
        blocks = list(h)[:n] + [h[0]] * max(0, n - len(h))
        model.transformer.h = torch.nn.ModuleList(blocks)
    try:
        yield
    finally:
        model.transformer.h = h
        if n is not None:
            model.clear_cache()


@contextlib.contextmanager
def _gpu_path() -> Iterator[None]:
    """The engine's module-by-module step on CPU too (what "unfused" runs on a GPU), not the CPU
    engine's one-call C++ forward (gpt2_fast/cpu_decode.py, off with GPT2_FAST_CPU_FUSED=0)."""
    import os
    saved = os.environ.get("GPT2_FAST_CPU_FUSED")
    os.environ["GPT2_FAST_CPU_FUSED"] = "0"
    try:
        yield
    finally:
        os.environ.pop("GPT2_FAST_CPU_FUSED") if saved is None else os.environ.__setitem__("GPT2_FAST_CPU_FUSED", saved)


def count_step(model, step: str = "unfused", sampling: str = "greedy", batch: int = 1,
               prompt_len: int = 4, depth: Optional[int] = None) -> OpCounts:
    """The launches of one eager decode step of the engine (what a CUDA graph would capture),
    with the GPU's steps on any device."""
    from ..engine import Engine, SamplingMode
    kw = SAMPLING[sampling]
    cfg = model.config
    with _depth(model, depth), _gpu_path(), torch.inference_mode():
        engine = Engine(model, cuda_graph=False, decode_step=step)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        warm = 3 if model.transformer.wte.weight.is_cuda else 2  # 2 steps on CUDA (autotuning)
        for _ in engine.generate_ids(prompts, warm, stop_at_eot=False, **kw):
            pass
        buf = engine._buffers[next(iter(engine._buffers))]
        mode = SamplingMode.make(kw["temperature"], kw.get("top_k"), kw.get("top_p"), cfg.vocab_size)
        last = prompt_len + warm - 2         # redo the last warm-up step: its cache slot exists
        buf.pos.fill_(last)
        with counting() as counts:
            engine._step(buf, mode, live=last + 1)
    return counts


def per_layer_and_fixed(model, step: str = "unfused", sampling: str = "greedy",
                        batch: int = 1) -> dict:
    """{per_layer, fixed, total (at the model's depth), n_layer, linear, by_op, host_reads}."""
    n1 = count_step(model, step, sampling, batch, depth=1)
    n2 = count_step(model, step, sampling, batch, depth=2)
    L = len(model.transformer.h)
    full = n2 if L == 2 else (n1 if L == 1 else count_step(model, step, sampling, batch))
    per_layer = n2.total - n1.total
    fixed = n1.total - per_layer
    return dict(step=step, sampling=sampling, batch=batch, per_layer=per_layer, fixed=fixed,
                total=full.total, n_layer=L, linear=full.total == fixed + L * per_layer,
                by_op=dict(sorted(full.launches.items(), key=lambda kv: -kv[1])),
                host_reads=dict(full.host_reads))


def report(model, steps=("unfused", "fused"), batch: int = 1) -> list[dict]:
    """Count every (step, sampling) pair and print a table; a step that cannot run here is
    reported with the reason."""
    rows = []
    for step in steps:
        for sampling in SAMPLING:
            try:
                rows.append(per_layer_and_fixed(model, step, sampling, batch))
            except (NotImplementedError, RuntimeError, ValueError) as e:
                rows.append(dict(step=step, sampling=sampling, skipped=f"{type(e).__name__}: {e}"))
    print(f"kernel launches per decode step (batch {batch}; torch ops + Triton kernels; views, "
          f"allocations and no-ops excluded; a proxy for a CUDA graph's launches):")
    print(f"  {'step':8s} {'sampling':8s} {'per layer':>9s} {'fixed':>6s} {'total':>6s}  host reads  ops")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['step']:8s} {r['sampling']:8s} skipped: {r['skipped']}")
            continue
        ops = ", ".join(f"{k} {v}" for k, v in r["by_op"].items())
        print(f"  {r['step']:8s} {r['sampling']:8s} {r['per_layer']:9d} {r['fixed']:6d} "
              f"{r['total']:6d}  {sum(r['host_reads'].values()):10d}  {ops}")
    return rows

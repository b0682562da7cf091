"""The A/B table: every implementation choice that only a GPU measurement can decide.

Each choice has an environment variable that forces one side, so `bench/gpu_check.sh` can
measure both sides in one run on a lent GPU; without the variable the default applies. A default
is either "measured" (it names the committed result in bench/results/ that decided it) or "not
measured" (today's best guess, to be replaced by the first GPU run). The dispatcher (ops.py), the
decode engine and the benchmarks read their choice here and nowhere else, and resolve it once,
outside traced code (this module does no imports at call time and keeps no hidden state).

    from gpt2_fast.choices import choice
    if choice("decode_step") == "fused": ...

`gpt2-fast info` and the benchmarks print `table()`, so every result records what was chosen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Choice:
    name: str
    env: str                   # the environment variable that forces one side
    options: tuple[str, ...]   # the sides, the default first
    default: str
    measured: Optional[str]    # the bench/results file that decided the default, or None
    what: str                  # one line: what the choice is between


CHOICES: dict[str, Choice] = {c.name: c for c in (
    Choice("attention_bwd", "GPT2_FAST_ATTN_BWD", ("triton_det", "triton_atomic", "sdpa"), "triton_det",
           None, "causal attention backward on CUDA: our deterministic two-kernel Triton backward, "
           "the one-kernel 5-matmul version with fp32 atomics for dQ, or torch SDPA (cuDNN/flash)"),
    Choice("attention_fwd", "GPT2_FAST_ATTN_FWD", ("triton", "sdpa"), "triton", None,
           "causal attention forward on CUDA: our Triton kernel or torch SDPA"),
    Choice("attention_fwd_kernel", "GPT2_FAST_ATTN_FWD_KERNEL", ("v1", "pipelined"), "v1", None,
           "which Triton attention forward: v1 (in-order loop) or pipelined (QK^T of the next key "
           "block issued before this block's softmax)"),
    Choice("decode_step", "GPT2_FAST_DECODE_STEP", ("unfused", "fused"), "unfused", None,
           "one decode token: the module-by-module step or the fused GEMV-family step"),
    Choice("decode_runner", "GPT2_FAST_DECODE_RUNNER", ("graph", "compile"), "graph", None,
           "how a CUDA decode step is replayed: torch.cuda.CUDAGraph or torch.compile reduce-overhead"),
    Choice("int8_matmul", "GPT2_FAST_INT8_MATMUL", ("gemv", "dequant"), "gemv", None,
           "int8 weight-only decode on CUDA: the fused int8 GEMV or dequantize to bf16 + cuBLAS"),
)}


def choice(name: str) -> str:
    """The side in force for `name`: the environment's, else the default. Bad values raise."""
    c = CHOICES.get(name)
    if c is None:
        raise KeyError(f"unknown choice {name!r}; expected one of {tuple(CHOICES)}")
    value = os.environ.get(c.env, "").strip()
    if not value:
        return c.default
    if value not in c.options:
        raise ValueError(f"{c.env} must be one of {', '.join(c.options)}; got {value!r}")
    return value


def table() -> dict[str, dict]:
    """{name: {value, source, options, env}} of every choice, for logs and result files."""
    out = {}
    for name, c in CHOICES.items():
        forced = os.environ.get(c.env, "").strip()
        out[name] = {"value": choice(name), "options": list(c.options), "env": c.env,
                     "source": f"env {c.env}" if forced else
                     (f"measured: {c.measured}" if c.measured else "default, not measured")}
    return out

"""The fused decode step: one token of every row of a batch bucket in 5 launches per block + 4.

    embed          x = wte[seq[:, pos]] + wpe[pos - kv_start]                 (kernels/decode_gemv)
    per block      qkv GEMV (ln_1 prologue, k/v into the cache slot)  ->  decode attention (one
                   launch, combine fused)  ->  c_proj GEMV (+= x)  ->  c_fc GEMV (ln_2 prologue,
                   bias + GELU)  ->  mlp c_proj GEMV (+= x)
    LM head        logits = ln_f(x) @ wte^T                              (GEMV, ln_f prologue)
    sampler        greedy / temperature / top-k / top-p, token -> seq[:, pos + 1], done  (kernels/sampler)
    pos += 1

It computes what Engine._step computes on the same static buffers (StepBuffers), reads no value
on the host, and keeps every intermediate in per-bucket scratch allocated once, so one CUDA graph
per (bucket, sampling mode) replays it. kv_len is pos + 1 and every kernel reads pos itself, so
positions and lengths cost no launch. int8 models (gpt2_fast/quant.py) run the same GEMVs with
their int8 weights and per-channel scales.

Chosen by gpt2_fast/choices.py `decode_step` ("unfused" | "fused", env GPT2_FAST_DECODE_STEP),
resolved when the engine builds its step. It runs where the Triton kernels run: CUDA, or CPU
under TRITON_INTERPRET=1 (the tests); on CPU without the interpreter the engine keeps its own
step (resolve_step). decode_runner "compile" wraps a step in torch.compile (compiled_runner).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .tokenizer import EOT_TOKEN

STEPS = ("unfused", "fused")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the fused step cannot run on `device` (None: it can)."""
    from .kernels import unavailable_reason as triton_unavailable
    return triton_unavailable(device.type)


def resolve_step(requested: Optional[str], device: torch.device) -> str:
    """The step an engine on `device` runs: `requested` (an Engine argument) must run here;
    the environment's choice falls back to "unfused" where the Triton kernels cannot run (CPU
    without the interpreter keeps the CPU engine's own step)."""
    from .choices import choice
    if requested is not None:
        if requested not in STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(STEPS)}; got {requested!r}")
        if requested == "fused" and unavailable_reason(device) is not None:
            raise ValueError(f"decode_step='fused' cannot run on {device}: {unavailable_reason(device)}")
        return requested
    side = choice("decode_step")
    return side if side == "unfused" or unavailable_reason(device) is None else "unfused"


@dataclass
class _Linear:
    weight: Tensor                   # (N, K) float, or int8 with scale
    scale: Optional[Tensor]          # (N,) fp32 for int8
    bias: Optional[Tensor]


def _linear(mod) -> _Linear:
    if hasattr(mod, "weight_int8"):
        return _Linear(mod.weight_int8, mod.scale, mod.bias)
    return _Linear(mod.weight, None, mod.bias)


def _ln(mod, eps: float):
    return (mod.weight, mod.bias, eps)


class _Scratch:
    """Per-bucket intermediates (fixed addresses for graph replay)."""

    def __init__(self, M: int, cfg, dtype: torch.dtype, device: torch.device, num_splits: int):
        from .kernels import decode_gemv as G
        C, H = cfg.n_embd, cfg.n_head
        self.x = torch.empty(M, C, dtype=dtype, device=device)           # residual stream
        self.q = torch.empty(M, C, dtype=dtype, device=device)
        self.y = torch.empty(M, C, dtype=dtype, device=device)           # attention output
        self.h = torch.empty(M, 4 * C, dtype=dtype, device=device)       # MLP hidden
        self.logits = torch.empty(M, cfg.vocab_size, dtype=dtype, device=device)
        self.attn = G.attn_workspace(M, H, C // H, num_splits, device)
        self.num_splits = num_splits


class FusedDecodeStep:
    """Engine._step's work for a gpt2_fast GPT (float or quantize_int8) in the fused kernels."""

    def __init__(self, model):
        from .choices import choice
        cfg = model.config
        self.model, self.cfg = model, cfg
        if not isinstance(model.transformer.wte, torch.nn.Embedding):  # e.g. quant.Int8Embedding
            raise TypeError("the fused decode step reads the token embedding as a float table; this model's "
                            f"wte is a {type(model.transformer.wte).__name__} (pack_for_cpu_inference: CPU only)")
        wte = model.transformer.wte.weight
        self.dtype, self.device = wte.dtype, wte.device
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"the fused decode step needs fp32/fp16/bf16 weights, got {self.dtype}")
        if getattr(model, "quantized", None) and choice("int8_matmul") == "dequant":
            raise NotImplementedError("the fused decode step runs int8 weights only through its int8 GEMV; "
                                      "GPT2_FAST_INT8_MATMUL=dequant needs GPT2_FAST_DECODE_STEP=unfused")
        eps = cfg.layer_norm_epsilon
        self.layers = []
        for blk in model.transformer.h:
            cache = blk.attn.kv_cache
            self.layers.append(dict(ln_1=_ln(blk.ln_1, eps), ln_2=_ln(blk.ln_2, eps),
                                    attn=_linear(blk.attn.c_attn), proj=_linear(blk.attn.c_proj),
                                    fc=_linear(blk.mlp.c_fc), mlp=_linear(blk.mlp.c_proj),
                                    k_cache=cache.k_cache, v_cache=cache.v_cache))
            if cache.k_cache.stride(3) != 1 or cache.k_cache.dtype != self.dtype:
                raise ValueError("the fused decode step needs KV caches in the weights' dtype with unit D stride")
        self.ln_f = _ln(model.transformer.ln_f, eps)
        self.lm_head = _linear(model.lm_head)
        self.wte, self.wpe = wte, model.transformer.wpe.weight
        self.sm_scale = 1.0 / math.sqrt(cfg.n_embd // cfg.n_head)
        self._scratch: dict[int, _Scratch] = {}

    def scratch(self, M: int) -> _Scratch:
        s = self._scratch.get(M)
        if s is None:
            from .kernels import decode_gemv as G
            S = self.layers[0]["k_cache"].shape[2]
            splits = G.attn_splits(M, self.cfg.n_head, S, self.device)
            s = self._scratch[M] = _Scratch(M, self.cfg, self.dtype, self.device, splits)
        return s

    def __call__(self, buf, mode) -> None:
        """One decode step on the engine's StepBuffers `buf` with SamplingMode `mode`."""
        from .kernels import decode_gemv as G
        from .kernels import sampler
        s = self.scratch(buf.bucket)
        x, pos = s.x, buf.pos
        G.embed(buf.seq, pos, buf.kv_start, self.wte, self.wpe, x)
        for layer in self.layers:
            a, p, f, m = layer["attn"], layer["proj"], layer["fc"], layer["mlp"]
            G.qkv_gemv(x, a.weight, layer["ln_1"], s.q, layer["k_cache"], layer["v_cache"], pos, a.scale, a.bias)
            G.attn_decode(s.q, layer["k_cache"], layer["v_cache"], pos, buf.kv_start, s.y, s.attn,
                          s.num_splits, self.sm_scale)
            G.gemv(s.y, p.weight, x, p.scale, p.bias, residual=True)
            G.gemv(x, f.weight, s.h, f.scale, f.bias, ln=layer["ln_2"], gelu=True)
            G.gemv(s.h, m.weight, x, m.scale, m.bias, residual=True)
        head = self.lm_head
        G.gemv(x, head.weight, s.logits, head.scale, head.bias, ln=self.ln_f)
        sampler.sample(s.logits, mode.greedy, mode.top_k, mode.use_top_p, buf.temperature, buf.top_p,
                       buf.seed, pos, step=(buf.seq, pos, buf.done, buf.stop, EOT_TOKEN))
        buf.pos += 1


class CompiledRunner:
    """decode_runner "compile": fn (a step on static buffers) under torch.compile(mode=
    "reduce-overhead"), replayed like a CUDA graph. CUDA only."""

    def __init__(self, fn):
        self.fn = torch.compile(fn, mode="reduce-overhead")
        self.fn()                                   # compile (and record) now, not mid-generation

    def replay(self) -> None:
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        if mark is not None:
            mark()
        self.fn()


def compiled_runner(fn, device: torch.device, reset=None) -> CompiledRunner:
    if device.type != "cuda":
        raise NotImplementedError(f"GPT2_FAST_DECODE_RUNNER=compile needs CUDA (reduce-overhead is CUDA "
                                  f"graphs); this engine is on {device}")
    for compile_it in (False, True):  # eager first: lazy buffers (the fused step's scratch) and
        runner = CompiledRunner(fn) if compile_it else fn()  # Triton's compiles stay out of the trace
        if reset is not None:
            reset()
    return runner

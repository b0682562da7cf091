"""Kernel microbenchmarks: every fused op x provider x mode x GPT-2 shape, against the ceiling.

Providers (each a function with the reference signature, gpt2_fast/reference.py):
  torch          the pure-torch reference `<op>_ref`, eager (what ops.py falls back to)
  torch-native   torch's own fused kernel where it has one (F.layer_norm)
  compile        torch.compile of the reference (compile time reported, not timed)
  sdpa-flash / sdpa-cudnn / sdpa-efficient / sdpa-math
                 F.scaled_dot_product_attention pinned to one backend (attention; for decode
                 over the live slice of the cache)
  liger          Liger-Kernel, where importable (layer_norm, cross-entropy, fused linear CE)
  triton / cuda / cpp
                 ours, resolved through gpt2_fast.ops.resolve(op, backend, device type), so
                 whatever kernels exist when this runs are measured
  triton-fwd-v1 / triton-fwd-pipelined / triton-bwd-det / triton-bwd-atomic / triton-bwd-sdpa
                 our Triton attention with one side of an A/B choice forced (gpt2_fast/choices.py
                 attention_fwd_kernel, attention_bwd); the bwd sides are measured in bwd modes only
A provider that cannot run here is listed as skipped with its reason.

Work counted (e = bytes per element; N rows, C width; the napkin math behind GB/s, TFLOP/s):
  layer_norm          fwd reads x, writes y: 2NCe; bwd reads x, dy, writes dx: 3NCe; fwd+bwd 5NCe
                      (weight/bias and the dw/db partials are O(C) and not counted)
  add_layer_norm      fwd reads x, residual, writes s, y: 4NCe; bwd reads s, ds, dy, writes dx
                      (d residual is the same tensor): 4NCe; fwd+bwd 8NCe
  bias_gelu           on (N, 4C): fwd 2 N 4C e; bwd reads x, dy, writes dx: 3 N 4C e; fwd+bwd 5
  attention           FLOPs 4 B H T^2 D x 0.5 (causal); bwd x 2.5; fwd+bwd x 3.5
  decode_attention    reads the live K and V: 2 B H S D e (+ q and o)
  softmax_cross_entropy  fwd reads the logits: N V e; bwd and fwd+bwd read the logits and
                      write dlogits: 2 N V e (what a fused kernel must move)
  lm_head_cross_entropy  FLOPs 2 N C V fwd, 4 N C V bwd, 6 N C V fwd+bwd; peak memory reported
GB/s is compared with the copy bandwidth and TFLOP/s with the matmul rate of the same dtype,
both measured in the same run (common.measure_ceilings).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..config import PRESETS
from . import common

OP_GROUPS = {
    "layer_norm": ("layer_norm", "add_layer_norm"),
    "bias_gelu": ("bias_gelu",),
    "attention": ("attention",),
    "decode_attention": ("decode_attention",),
    "cross_entropy": ("softmax_cross_entropy", "lm_head_cross_entropy"),
}
ALL_OPS = tuple(op for group in OP_GROUPS.values() for op in group)
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("torch", "torch-native", "compile", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
             "sdpa-math", "liger", "triton", "cuda", "cpp")
OURS = ("triton", "cuda", "cpp")
# our Triton attention with one A/B side forced: provider -> (forward kernel, backward variant)
ATTN_VARIANTS = {"triton-fwd-v1": ("v1", None), "triton-fwd-pipelined": ("pipelined", None),
                 "triton-bwd-det": (None, "triton_det"), "triton-bwd-atomic": (None, "triton_atomic"),
                 "triton-bwd-sdpa": (None, "sdpa")}
PROVIDERS += tuple(ATTN_VARIANTS)

# (n_embd, n_head) of the GPT-2 presets, and a tiny one for quick CPU runs.
PRESET_DIMS = {name: (p["n_embd"], p["n_head"]) for name, p in PRESETS.items()}
TINY = "tiny"
PRESET_DIMS[TINY] = (96, 3)
ROWS = 16384          # B*T of a GPT-2 training step (16 x 1024)
VOCAB = 50257
SEQS = (1024, 4096)
DECODE_SHAPES = ((1, 1024), (16, 1024))      # (batch, cache length)


@dataclass
class Case:
    op: str
    mode: str
    shape: dict
    dtype: torch.dtype

    @property
    def label(self) -> str:
        s = self.shape
        if self.op == "attention":
            dims = f"B{s['B']} H{s['H']} T{s['T']} D{s['D']}"
        elif self.op == "decode_attention":
            dims = f"B{s['B']} H{s['H']} S{s['S']} D{s['D']}"
        elif self.op in ("softmax_cross_entropy", "lm_head_cross_entropy"):
            dims = f"N{s['N']} C{s['C']} V{s['V']}" if "C" in s else f"N{s['N']} V{s['V']}"
        else:
            dims = f"N{s['N']} C{s['C']}"
        return f"{s['preset']} {dims}"


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

def modes_of(op: str) -> tuple[str, ...]:
    return ("fwd",) if op == "decode_attention" else MODES


def cases(ops_: tuple[str, ...], modes: tuple[str, ...], presets: tuple[str, ...], seqs: tuple[int, ...],
          dtype: torch.dtype, quick: bool) -> list[Case]:
    """The shapes: GPT-2 widths at B*T = 16384 (tiny ones in quick mode on CPU)."""
    out = []
    for op in ops_:
        for name in presets:
            C, H = PRESET_DIMS[name]
            tiny = name == TINY
            rows = 128 if tiny else ROWS
            if op in ("layer_norm", "add_layer_norm"):
                shapes = [dict(N=rows, C=C)]
            elif op == "bias_gelu":
                shapes = [dict(N=rows, C=4 * C)]
            elif op == "attention":
                shapes = [dict(B=1, H=2, T=64, D=32)] if tiny else \
                    [dict(B=max(1, ROWS // T), H=H, T=T, D=C // H) for T in seqs]
            elif op == "decode_attention":
                shapes = [dict(B=1, H=2, S=64, D=32)] if tiny else \
                    [dict(B=b, H=H, S=s, D=C // H) for b, s in DECODE_SHAPES]
            elif op == "softmax_cross_entropy":
                shapes = [dict(N=64, V=1000)] if tiny else [dict(N=ROWS, V=VOCAB)]
                if name != presets[0]:
                    shapes = []  # does not depend on the width: once
            elif op == "lm_head_cross_entropy":
                shapes = [dict(N=64, C=C, V=1000)] if tiny else [dict(N=ROWS, C=C, V=VOCAB)]
            else:
                raise ValueError(f"unknown op {op!r}; expected one of {ALL_OPS}")
            for shape in shapes:
                for mode in modes_of(op):
                    if mode in modes:
                        out.append(Case(op, mode, dict(preset=name, **shape), dtype))
    return out


# ---------------------------------------------------------------------------------------------
# inputs and work
# ---------------------------------------------------------------------------------------------

def make_inputs(case: Case, device: torch.device, requires_grad: bool) -> tuple[tuple, list]:
    """(args in the reference signature order, the tensors to differentiate)."""
    s, dt = case.shape, case.dtype
    g = dict(device=device, dtype=dt, requires_grad=requires_grad)
    if case.op == "layer_norm":
        x, w, b = torch.randn(s["N"], s["C"], **g), torch.randn(s["C"], **g), torch.randn(s["C"], **g)
        return (x, w, b, 1e-5), [x, w, b]
    if case.op == "add_layer_norm":
        x, r = torch.randn(s["N"], s["C"], **g), torch.randn(s["N"], s["C"], **g)
        w, b = torch.randn(s["C"], **g), torch.randn(s["C"], **g)
        return (x, r, w, b, 1e-5), [x, r, w, b]
    if case.op == "bias_gelu":
        x, b = torch.randn(s["N"], s["C"], **g), torch.randn(s["C"], **g)
        return (x, b), [x, b]
    if case.op == "attention":
        q, k, v = (torch.randn(s["B"], s["H"], s["T"], s["D"], **g) for _ in range(3))
        return (q, k, v, True, 0.0, None), [q, k, v]
    if case.op == "decode_attention":
        q = torch.randn(s["B"], s["H"], 1, s["D"], device=device, dtype=dt)
        kc, vc = (torch.randn(s["B"], s["H"], s["S"], s["D"], device=device, dtype=dt) for _ in range(2))
        kv_len = torch.full((s["B"],), s["S"], dtype=torch.int32, device=device)
        return (q, kc, vc, kv_len, None, None), []
    if case.op == "softmax_cross_entropy":
        logits = torch.randn(s["N"], s["V"], **g)
        t = torch.randint(0, s["V"], (s["N"],), device=device)
        return (logits, t, -100), [logits]
    if case.op == "lm_head_cross_entropy":
        h = torch.randn(s["N"], s["C"], **g)
        w = (torch.randn(s["V"], s["C"], device=device, dtype=dt) * 0.02).requires_grad_(requires_grad)
        t = torch.randint(0, s["V"], (s["N"],), device=device)
        return (h, w, t, -100, None), [h, w]
    raise ValueError(f"unknown op {case.op!r}")


def work(case: Case) -> tuple[str, float]:
    """("GB/s", bytes) or ("TFLOP/s", flops) of one call: see the module doc."""
    s, mode = case.shape, case.mode
    e = torch.empty((), dtype=case.dtype).element_size()
    if case.op == "layer_norm":
        return "GB/s", {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * s["N"] * s["C"] * e
    if case.op == "add_layer_norm":
        return "GB/s", {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * s["N"] * s["C"] * e
    if case.op == "bias_gelu":
        return "GB/s", {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * s["N"] * s["C"] * e
    if case.op == "attention":
        fwd = 4 * s["B"] * s["H"] * s["T"] ** 2 * s["D"] * 0.5
        return "TFLOP/s", fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    if case.op == "decode_attention":
        return "GB/s", (2 * s["S"] + 2) * s["B"] * s["H"] * s["D"] * e
    if case.op == "softmax_cross_entropy":
        return "GB/s", {"fwd": 1, "bwd": 2, "fwd+bwd": 2}[mode] * s["N"] * s["V"] * e
    if case.op == "lm_head_cross_entropy":
        return "TFLOP/s", {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * s["N"] * s["C"] * s["V"]
    raise ValueError(f"unknown op {case.op!r}")


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------

def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]


def _sdpa_attention(backend):
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v, causal=True, dropout_p=0.0, scale=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    return attention


def _sdpa_decode(backend):
    """SDPA of the new query over the live slice of the cache (every row full: kv_len = S)."""
    from torch.nn.attention import sdpa_kernel

    def decode_attention(q, k_cache, v_cache, kv_len, kv_start=None, scale=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k_cache, v_cache, is_causal=False, scale=scale)
    return decode_attention


def _liger(op: str):
    """Liger-Kernel's version of op, or raise with the reason."""
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:
        raise LookupError(f"liger_kernel is not importable ({type(e).__name__})") from None
    if op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        return lambda x, w, b, eps=1e-5: LigerLayerNormFunction.apply(x, w, b, eps)
    if op == "softmax_cross_entropy":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        loss = LigerCrossEntropyLoss(ignore_index=-100)
        return lambda logits, t, ignore_index=-100: loss(logits, t)
    if op == "lm_head_cross_entropy":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, t, ignore_index=-100, vocab_size=None: loss(w, h, t)
    raise LookupError(f"Liger-Kernel has no {op} kernel")


def _native(op: str):
    if op == "layer_norm":
        return lambda x, w, b, eps=1e-5: F.layer_norm(x, x.shape[-1:], w, b, eps)
    if op == "add_layer_norm":
        def add_layer_norm(x, r, w, b, eps=1e-5):
            s = x + r
            return s, F.layer_norm(s, s.shape[-1:], w, b, eps)
        return add_layer_norm
    raise LookupError(f"torch has no single fused kernel for {op} beyond the reference")


def applicable(op: str, provider: str) -> bool:
    """Whether `provider` has a version of `op` at all (else it is left out, not 'skipped')."""
    if provider.startswith("sdpa-"):
        return op in ("attention", "decode_attention")
    if provider == "torch-native":
        return op in ("layer_norm", "add_layer_norm")
    if provider == "liger":
        return op in ("layer_norm", "softmax_cross_entropy", "lm_head_cross_entropy")
    if provider in ATTN_VARIANTS:
        return op == "attention"
    return True


def _force_attention_sides(fwd_kernel: Optional[str] = None, bwd_variant: Optional[str] = None) -> None:
    """Set our Triton attention's A/B sides (module constants its ops read) for the rows that
    follow; None = the side choices.py puts in force. Eager only: nothing here is traced."""
    import importlib

    from ..choices import choice
    fa = importlib.import_module("gpt2_fast.kernels.flash_attention")
    fa.FWD_KERNEL = fwd_kernel or choice("attention_fwd_kernel")
    fa.BWD_VARIANT = bwd_variant or choice("attention_bwd")


def provider_fn(op: str, provider: str, device: torch.device, allow_compile: bool) -> tuple[Optional[Callable], str]:
    """(fn with the reference signature, backend detail) or (None, the reason it cannot run)."""
    ref = getattr(reference, op + "_ref")
    if provider == "torch":
        return ref, "reference eager"
    if provider == "torch-native":
        try:
            return _native(op), "torch fused op"
        except LookupError as e:
            return None, str(e)
    if provider == "compile":
        if not allow_compile:
            return None, ("torch.compile skipped on CPU in quick mode (compiling takes minutes here); "
                          "pass --compile to include it")
        return torch.compile(ref, dynamic=False), "torch.compile(reference)"
    if provider.startswith("sdpa-"):
        if op == "attention":
            return _sdpa_attention(_sdpa_backend(provider)), "F.scaled_dot_product_attention"
        if op == "decode_attention":
            return _sdpa_decode(_sdpa_backend(provider)), "SDPA over the live cache"
        return None, "SDPA providers apply to attention only"
    if provider == "liger":
        try:
            return _liger(op), "liger_kernel"
        except LookupError as e:
            return None, str(e)
        except Exception as e:
            return None, f"liger_kernel failed: {type(e).__name__}: {e}"
    if provider in OURS or provider in ATTN_VARIANTS:
        backend = "triton" if provider in ATTN_VARIANTS else provider
        try:
            name, fn = ops.resolve(op, backend, device.type)
            if op == "attention" and (backend == "triton" or "gpt2_fast.kernels.flash_attention" in sys.modules):
                _force_attention_sides(*ATTN_VARIANTS.get(provider, (None, None)))
        except ops.BackendUnavailable as e:
            return None, str(e)
        except Exception as e:
            return None, f"backend {provider!r} failed: {type(e).__name__}: {e}"
        if name != backend:
            return None, f"backend {provider!r} has no {op} (ops falls back to {name})"
        mod = getattr(fn, "__module__", "") or ""
        detail = f"ours ({mod})" if mod else "ours"
        if backend == "triton" and device.type == "cpu":
            detail += " under TRITON_INTERPRET: not a speed figure"
        return fn, detail
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ---------------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------------

# Reasons that mean "this provider has no such op" (status n/a, left out of the printed list).
NOT_APPLICABLE = ("SDPA providers apply", "torch has no single fused kernel", "Liger-Kernel has no",
                  "a backward variant")


@dataclass
class Prepared:
    """A ready-to-time call: fn() runs one op call in the case's mode."""
    fn: Callable[[], object]
    grad_to_none: list = field(default_factory=list)
    compile_s: Optional[float] = None
    max_err: Optional[float] = None
    detail: str = ""


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_err(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
               for x, y in zip(_outputs(a), _outputs(b)))


def prepare(case: Case, provider: str, device: torch.device, allow_compile: bool = True):
    """A Prepared call, or a str giving why `provider` cannot run `case` here."""
    if provider in ATTN_VARIANTS and ATTN_VARIANTS[provider][0] is None and case.mode == "fwd":
        return "a backward variant: the fwd row is the triton row"
    fn, detail = provider_fn(case.op, provider, device, allow_compile)
    if fn is None:
        return detail
    torch.manual_seed(0)
    grad = case.mode != "fwd"
    args, diff = make_inputs(case, device, requires_grad=grad)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        common.sync(device)
    except Exception as e:  # an unsupported shape/dtype/backend combination: a skip, not an error
        return _reason(e)
    compile_s = time.perf_counter() - t0 if provider == "compile" else None
    with torch.no_grad():
        ref_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        max_err = _max_err(out, getattr(reference, case.op + "_ref")(*ref_args))
    if case.mode == "fwd":
        def call():
            return fn(*args)
        return Prepared(call, [], compile_s, max_err, detail)
    outs = _outputs(out)
    dys = [torch.randn_like(o) for o in outs]
    if case.mode == "bwd":
        def call():
            return torch.autograd.grad(outs, diff, dys, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(_outputs(fn(*args)), diff, dys)
    try:
        call()
        common.sync(device)
    except Exception as e:
        return _reason(e)
    return Prepared(call, [], compile_s, max_err, detail)


def _reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    return f"failed here: {type(e).__name__}: {msg[:200]}"


def measure(case: Case, provider: str, device: torch.device, ceilings: dict, quick: bool,
            allow_compile: bool = True) -> dict:
    """One row: timing, throughput, % of ceiling, peak memory; or status 'skipped' + reason."""
    row = dict(op=case.op, mode=case.mode, shape=case.label, preset=case.shape["preset"],
               provider=provider, dtype=str(case.dtype).replace("torch.", ""))
    common.reset_peak_memory(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        p = prepare(case, provider, device, allow_compile)
        if isinstance(p, str):
            return dict(row, status="n/a" if p.startswith(NOT_APPLICABLE) else "skipped", reason=p)
        t = common.bench(p.fn, device, warmup_ms=5 if quick else 25, rep_ms=20 if quick else 100,
                         min_reps=3 if quick else 10)
    except Exception as e:
        return dict(row, status="skipped", reason=_reason(e))
    metric, amount = work(case)
    value = amount / (t["ms"] * 1e-3) / (1e9 if metric == "GB/s" else 1e12)
    ceiling = ceilings.get("copy_gbps") if metric == "GB/s" else common.matmul_ceiling(ceilings, case.dtype)
    peak = common.peak_memory_gb(device)
    row.update(status="ok", detail=p.detail, ms=t["ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"],
               reps=t["reps"], metric=metric, value=value,
               pct_ceiling=100.0 * value / ceiling if ceiling else None,
               peak_mem_gb=None if peak is None else max(0.0, peak - base / 1e9),
               max_err=p.max_err, compile_s=p.compile_s,
               work=amount)
    return row


def pytest_bench(benchmark, case: Case, provider: str, device: torch.device, ceilings: dict,
                 quick: bool, allow_compile: Optional[bool] = None) -> dict:
    """The body of every bench/test_bench_<op>.py test (pytest-benchmark's `benchmark` fixture).

    extra_info gets the authoritative figures of common.bench (CUDA events, L2 flushed, median):
    ms, GB/s or TFLOP/s, % of the ceiling measured in the same session, peak memory, max error vs
    the reference. pytest-benchmark's own statistics time the same call followed by a device
    sync (wall clock), a few rounds, so that its JSON/compare tooling works as usual.
    """
    import os

    import pytest
    if allow_compile is None:  # compiling takes minutes on a CPU: opt in there
        allow_compile = not (quick and device.type == "cpu") or os.environ.get("GPT2_FAST_BENCH_COMPILE") == "1"
    common.reset_peak_memory(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    p = prepare(case, provider, device, allow_compile)
    if isinstance(p, str):
        pytest.skip(p.replace("pass --compile", "set GPT2_FAST_BENCH_COMPILE=1"))
    t = common.bench(p.fn, device, warmup_ms=5 if quick else 25, rep_ms=20 if quick else 100,
                     min_reps=3 if quick else 10)
    metric, amount = work(case)
    value = amount / (t["ms"] * 1e-3) / (1e9 if metric == "GB/s" else 1e12)
    ceiling = ceilings.get("copy_gbps") if metric == "GB/s" else common.matmul_ceiling(ceilings, case.dtype)
    peak = common.peak_memory_gb(device)
    info = dict(op=case.op, mode=case.mode, shape=case.label, provider=provider, detail=p.detail,
                dtype=str(case.dtype).replace("torch.", ""), device=common.device_name(device),
                ms=t["ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], metric=metric, value=value,
                work=amount, ceiling=ceiling, pct_ceiling=100.0 * value / ceiling if ceiling else None,
                peak_mem_gb=None if peak is None else max(0.0, peak - base / 1e9),
                max_err=p.max_err, compile_s=p.compile_s)
    benchmark.extra_info.update(info)

    def synced():
        p.fn()
        common.sync(device)
    benchmark.pedantic(synced, rounds=3 if quick else 10, warmup_rounds=1, iterations=1)
    return info


def pytest_params(ops_: tuple[str, ...]):
    """(device, quick, [(case, provider)]) for a bench file's parametrize, from the environment:
    GPT2_FAST_BENCH_DEVICE (default cuda if available), GPT2_FAST_BENCH_QUICK (default 1 on CPU),
    GPT2_FAST_BENCH_PRESETS (comma list; default all four on CUDA, tiny in quick mode),
    GPT2_FAST_BENCH_PROVIDERS, GPT2_FAST_BENCH_SEQS."""
    import os
    device = common.parse_device(os.environ.get("GPT2_FAST_BENCH_DEVICE") or None)
    quick = os.environ.get("GPT2_FAST_BENCH_QUICK", "1" if device.type == "cpu" else "0") == "1"
    presets = os.environ.get("GPT2_FAST_BENCH_PRESETS")
    presets = tuple(presets.split(",")) if presets else ((TINY,) if quick else tuple(PRESETS))
    providers = os.environ.get("GPT2_FAST_BENCH_PROVIDERS")
    providers = tuple(providers.split(",")) if providers else PROVIDERS
    seqs = tuple(int(s) for s in os.environ.get("GPT2_FAST_BENCH_SEQS", "1024,4096").split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = [(c, p) for c in cases(ops_, MODES, presets, seqs, dtype, quick)
              for p in providers if applicable(c.op, p)]
    return device, quick, params


def param_id(param) -> str:
    case, provider = param
    return f"{case.op}-{case.mode}-{case.label.replace(' ', '_')}-{provider}"


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

COLUMNS = ("op", "mode", "shape", "provider", "dtype", "status", "ms", "p10_ms", "p90_ms", "reps",
           "metric", "value", "pct_ceiling", "speedup_vs_torch", "peak_mem_gb", "mem_vs_torch", "max_err",
           "compile_s", "detail", "reason")
TABLE = (("op", "op"), ("mode", "mode"), ("shape", "shape"), ("provider", "provider"),
         ("ms", "ms"), ("value", "GB/s|TFLOP/s"), ("pct_ceiling", "% ceil"), ("speedup_vs_torch", "x torch"),
         ("peak_mem_gb", "peak GB"), ("mem_vs_torch", "mem/torch"), ("max_err", "max err"))


def compare_to_torch(rows: list) -> None:
    """Add speedup_vs_torch (torch eager ms / ms) and mem_vs_torch (peak / torch eager's peak) to
    every measured row whose case has a measured torch row."""
    ref = {(r["op"], r["mode"], r["shape"]): r for r in rows if r["provider"] == "torch" and r["status"] == "ok"}
    for r in rows:
        t = ref.get((r["op"], r["mode"], r["shape"]))
        if r["status"] != "ok" or t is None:
            continue
        r["speedup_vs_torch"] = t["ms"] / r["ms"]
        if r.get("peak_mem_gb") is not None and t.get("peak_mem_gb"):
            r["mem_vs_torch"] = r["peak_mem_gb"] / t["peak_mem_gb"]


def add_arguments(p) -> None:
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops ({', '.join(ALL_OPS)}) or 'cross_entropy' for both losses")
    p.add_argument("--providers", default="all", help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--modes", default="all", help="comma list of fwd, bwd, fwd+bwd")
    p.add_argument("--presets", default=None,
                   help="GPT-2 widths to run: comma list of gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "(default: all four; 'tiny' in quick mode on CPU)")
    p.add_argument("--seqs", default=",".join(map(str, SEQS)), help="attention sequence lengths (B = 16384/T)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="include torch.compile on CPU in quick mode (always included otherwise)")


def _split(value: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{what} must be a comma list of {', '.join(allowed)}; got {value!r}")
    return items


def select_ops(value: str) -> tuple[str, ...]:
    if value == "all":
        return ALL_OPS
    out = []
    for item in _split(value, tuple(OP_GROUPS) + ALL_OPS, "--ops"):
        out.extend((item,) if item in ALL_OPS else OP_GROUPS[item])  # an op name means that op alone
    return tuple(dict.fromkeys(out))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(args, device: torch.device, out_dir: str) -> dict:
    quick = args.quick
    ops_ = select_ops(args.ops)
    providers = PROVIDERS if args.providers == "all" else _split(args.providers, PROVIDERS, "--providers")
    modes = MODES if args.modes == "all" else _split(args.modes, MODES, "--modes")
    if args.presets:
        presets = _split(args.presets, tuple(PRESET_DIMS), "--presets")
    else:
        presets = (TINY,) if quick and device.type == "cpu" else tuple(PRESETS)
    try:
        seqs = tuple(int(s) for s in args.seqs.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seqs must be a comma list of ints, got {args.seqs!r}") from None
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    allow_compile = not (quick and device.type == "cpu") or args.compile

    st = common.stamp(device, quick)
    print(common.stamp_line(st), flush=True)
    ceilings = common.measure_ceilings(device, quick=quick)
    print("ceilings (measured now): " + ", ".join(f"{k} {common.fmt(v)}" for k, v in ceilings.items()),
          flush=True)
    rows: list = []
    result = {"kind": "kernels", "stamp": st, "ceilings": ceilings, "quick": quick, "rows": rows}
    json_path = common.result_path(out_dir, "kernels", st, "json") if out_dir else None
    csv_path = common.result_path(out_dir, "kernels", st, "csv") if out_dir else None
    for case in cases(ops_, modes, presets, seqs, dtype, quick):
        for provider in (p for p in providers if applicable(case.op, p)):
            row = measure(case, provider, device, ceilings, quick, allow_compile)
            rows.append(row)
            if row["status"] == "ok":
                print(f"  {row['op']:22s} {row['mode']:7s} {row['shape']:28s} {provider:14s} "
                      f"{common.fmt(row['ms']):>9s} ms  {common.fmt(row['value']):>8s} {row['metric']}"
                      f"  {common.fmt(row['pct_ceiling'])}% of ceiling", flush=True)
        compare_to_torch(rows)
        if out_dir:  # after every case: a run cut short by a timeout keeps what it measured
            common.write_json(json_path, result)
            common.write_csv(csv_path, rows, COLUMNS, st)
    ok = [r for r in rows if r["status"] == "ok"]
    print()
    print(common.format_table(ok, TABLE))
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["provider"], r["reason"]), set()).add(r["op"])
    if skipped:
        print("\nskipped:")
        for (prov, reason), ops_skipped in sorted(skipped.items()):
            print(f"  {prov:14s} {', '.join(sorted(ops_skipped))}: {reason}")
    if device.type == "cpu":
        print(f"\n{st['note'].upper()}")

    paths = {}
    if out_dir:
        paths["json"] = common.write_json(json_path, result)
        paths["csv"] = common.write_csv(csv_path, rows, COLUMNS, st)
        groups: dict = {}
        for r in ok:
            groups.setdefault(f"{r['op']} {r['mode']} ({r['metric']})", []).append(
                (r["shape"], r["provider"], r["value"]))
        png = common.plot_bars(common.result_path(out_dir, "kernels", st, "png"), groups, st,
                               lambda title: title.rsplit("(", 1)[-1].rstrip(")"))
        if png:
            paths["png"] = png
        print("wrote " + ", ".join(paths.values()))
    result["paths"] = paths
    return result


def main(argv=None) -> int:  # python -m gpt2_fast.benchmarks.kernels
    from .cli import main as cli_main
    return cli_main(["kernels"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())

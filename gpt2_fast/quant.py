"""Int8 weight-only quantization: per-output-channel symmetric scales, activations stay float.

    W (N, K) float  ->  W_q = round(W / s) in [-127, 127] (int8),  s[n] = max_k |W[n, k]| / 127
    y = x @ W^T + b  ~=  (x @ W_q^T) * s + b

At batch-1 decode every weight is read once per token and nothing else is: int8 halves the bytes
of bf16 (quarters fp32), so a GEMV that dequantizes in registers runs up to 2x faster. That is
the Triton kernel below (one program per BLOCK_N outputs x one row of x, fp32 accumulation, the
scale and bias applied once at the end). On CPU the compiled op torch.ops.gpt2_fast.cpu_linear
(csrc/cpu/gemv.cpp: AVX-512 / AVX2 / portable GEMV that converts int8 to fp32 in registers, up to
8 rows; ATen GEMM on a dequantized copy beyond) reads the int8 weight in place, in the (N, K)
layout quantize_weight produces (the layout the kernel streams: one sequential run per thread),
and the fused CPU decode step (gpt2_fast/cpu_decode.py) uses the same buffers. Elsewhere (no
extension, or kernel="torch") larger row counts dequantize to a float weight and call F.linear.

`quantize_int8(model)` swaps every block's four projections (and, by default, an untied int8
copy of the LM head; the embedding stays float until cpu_decode.pack_for_cpu_inference swaps it
for Int8Embedding, the head's own rows) for Int8Linear in place. The quantized model
generates and evaluates; it does not train and is not saved in the HF format.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import poison
from .choices import choice

KERNELS = ("auto", "triton", "torch", "cpp")
TRITON_MAX_ROWS = 16  # up to this many rows of x the fused GEMV kernel runs (decode, verify)


def quantize_weight(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (W_q (N, K) int8, scale (N,) float32), symmetric per output channel.
    bits < 8 keeps the int8 storage but uses only 2**(bits-1) - 1 levels (for tests)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax                      # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # (N, K)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and per-channel scales: forward(x) = x @ (W_q * s)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                        device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.int8_matmul = choice("int8_matmul")  # CUDA decode: "gemv" (fused) | "dequant" (+ cuBLAS)
        self.kernel = "auto"  # "triton" / "cpp" force the fused kernel of GPU / CPU, "torch" dequantizes

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "Int8Linear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, dtype=w.dtype, device=w.device)
        q, s = quantize_weight(w, bits)
        m.weight_int8.copy_(q)
        m.scale.copy_(s)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        """model.to(dtype) converts the bias but keeps the scales fp32 (a bf16 scale would be a
        0.4% per-channel error) and the weight int8; device moves apply to all."""
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(device=self.scale.device, dtype=torch.float32)
        return self

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) weight, for code that needs a dense one (slow path)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return (self.weight_int8.to(torch.float32) * self.scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, weight=int8 per-channel"

    def _use_triton(self, x: Tensor, rows: int) -> bool:
        if self.kernel not in KERNELS:
            raise ValueError(f"Int8Linear.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel != "auto":
            return self.kernel == "triton"
        side = getattr(self, "int8_matmul", "gemv")  # choices.py int8_matmul, set at construction
        return x.is_cuda and rows <= TRITON_MAX_ROWS and side == "gemv" and _triton_kernel() is not None

    def _use_cpp(self, x: Tensor) -> bool:
        if self.kernel == "cpp":
            if _cpu_linear_op() is None or not x.is_cpu:
                raise RuntimeError("Int8Linear.kernel='cpp' needs CPU tensors and the compiled extension")
            return True
        return self.kernel == "auto" and x.is_cpu and _cpu_linear_op() is not None

    def _linear(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expected inputs with last dim {self.in_features}, "
                             f"got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        if self._use_triton(x2, x2.shape[0]):
            y = int8_linear_fwd(x2, self.weight_int8, self.scale, bias)
        elif self._use_cpp(x2):
            b = bias.float().contiguous() if bias is not None else None
            y = _cpu_linear_op()(x2.float().contiguous(), self.weight_int8, self.scale, b, -1).to(x.dtype)
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
            if bias is not None:
                y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x: Tensor) -> Tensor:
        """x @ (W_q * s)^T without the bias (model.matmul_no_bias uses this)."""
        return self._linear(x, None)

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x, self.bias)


@functools.lru_cache(maxsize=None)
def _cpu_linear_op():
    """torch.ops.gpt2_fast.cpu_linear where the compiled extension has it, else None."""
    from . import extension
    if extension.unavailable_reason("cpu") is not None:
        return None
    return getattr(torch.ops.gpt2_fast, "cpu_linear", None)


def quantize_int8(model, lm_head: bool = True, bits: int = 8):
    """Replace the model's block projections (and the LM head) with Int8Linear, in place.
    Returns the model. The token embedding stays float (a gather reads one row per token);
    gpt2_fast.cpu_decode.pack_for_cpu_inference reads it from the int8 LM head instead when the
    two were tied."""
    if getattr(model, "quantized", None):
        raise ValueError(f"model is already quantized ({model.quantized})")
    if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        raise TypeError(f"expected a gpt2_fast GPT model, got {type(model).__name__}")
    with torch.no_grad():
        for block in model.transformer.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                                 (block.mlp, "c_fc"), (block.mlp, "c_proj")):
                setattr(parent, name, Int8Linear.from_linear(getattr(parent, name), bits))
        if lm_head:
            tied = model.lm_head.weight is model.transformer.wte.weight
            model.lm_head = Int8Linear.from_linear(model.lm_head, bits)  # unties: wte stays float
            if tied:  # remembered (a plain attribute, not a parameter) for pack_for_cpu_inference
                object.__setattr__(model.lm_head, "quantized_from", model.transformer.wte.weight)
    model.quantized = f"int{bits} weight-only" if bits != 8 else "int8 weight-only"
    return model


class Int8Embedding(nn.Module):
    """The token embedding read from an int8 LM head quantized from it (GPT-2's tied pair): row i is
    weight_int8[i] * scale[i] of the head, so the float table (V x C: 147 MiB fp32 for gpt2) can go.
    Made by gpt2_fast.cpu_decode.pack_for_cpu_inference for a CPU inference-only model. The head's
    tensors are read at call time (the head is not a submodule: its buffers move with it, once).
    `weight` is a 0-row tensor of the embedding's dtype on its device, for the code that asks a
    model's wte.weight what dtype and device the model has; there is no float table to index."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("weight", torch.empty(0, head.in_features, dtype=dtype,
                                                   device=head.weight_int8.device), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.head
        rows = F.embedding(idx, h.weight_int8).to(torch.float32) * h.scale[idx].unsqueeze(-1)
        return rows.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the int8 LM head"


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: parameters and quantized buffers (no caches)."""
    n = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
            if "wpe" not in name and "wte" not in name)
    n += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
             if name.endswith(("weight_int8", "scale")))
    if not isinstance(model.lm_head, Int8Linear):  # tied: the LM head reads all of wte
        n += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return n


# ---------------------------------------------------------------------------------------------
# The fused int8 GEMV (Triton): Y[m, n] = (sum_k X[m, k] W_q[n, k]) * S[n] (+ B[n])
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """The @triton.jit kernel, defined on first use (TRITON_INTERPRET must be set before), or
    None where Triton cannot run (no triton; CPU without the interpreter)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def _int8_linear_fwd_kernel(X, W, S, B, Y, N, K, stride_xm, stride_wn, stride_ym,
                                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(X + m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0).to(tl.float32)                       # int8 -> fp32 in registers
            acc += tl.sum(w * x[None, :], axis=1)
        acc = acc * tl.load(S + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=mask_n)

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return _int8_linear_fwd_kernel


def int8_linear_fwd(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                    block_n: int = 16, block_k: int = 256) -> Tensor:
    """x (M, K) float, weight_int8 (N, K) int8, scale (N,), bias (N,) or None -> (M, N) in x's dtype.
    Reads each weight byte once per row of x; meant for small M (decode)."""
    kernel = _triton_kernel()
    if kernel is None:
        raise RuntimeError("the int8 Triton kernel needs CUDA, or TRITON_INTERPRET=1 on CPU")
    if x.dim() != 2 or weight_int8.dim() != 2 or x.shape[1] != weight_int8.shape[1]:
        raise ValueError(f"expected x (M, K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight_int8.shape)}")
    if weight_int8.dtype != torch.int8 or scale.shape != (weight_int8.shape[0],):
        raise ValueError(f"expected an int8 weight and (N,) scale, got {weight_int8.dtype} and "
                         f"{tuple(scale.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight_int8 = weight_int8.contiguous()
    M, K = x.shape
    N = weight_int8.shape[0]
    y = poison.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    block_k = min(block_k, max(16, 1 << (K - 1).bit_length()))
    grid = (-(-N // block_n), M)
    kernel[grid](x, weight_int8, scale, bias if bias is not None else scale, y, N, K,
                 x.stride(0), weight_int8.stride(0), y.stride(0),
                 HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y

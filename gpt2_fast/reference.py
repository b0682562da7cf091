"""Pure-PyTorch reference for every fused op: the ground truth for the kernels and the CPU path.

Each `<op>_ref` has the signature its Triton (kernels/<op>.py) and C++/CUDA (csrc/<op>.*)
twins implement. With `upcast=True` the math runs in float64 and the result stays float64:
tests measure a kernel's error against that, next to the error of this same function run
in the kernel's own dtype (the flash-attention tolerance scheme, tests/tolerance.py).

Shapes: x (..., C) for the row-wise ops; q, k, v (B, H, T, D) for attention; the KV cache
(B, H, S, D) with `kv_len` (B,) live entries and `kv_start` (B,) left-padding entries.

Dtypes, and torch.autocast. Every backend (triton, cuda, cpp, torch) follows these rules, with the
helpers below (`autocast_dtype`, `layer_norm_out_dtype`, `matmul_dtype`) read in each public
function before its autograd.Function or registered op, so the custom ops never see autocast.
`ac` is torch.get_autocast_dtype(device) while torch.is_autocast_enabled(device), else none.
Inputs may mix fp32 / bf16 / fp16 as training makes them (fp32 parameters and residual stream,
16-bit Linear outputs under autocast); statistics and softmax are fp32 in every case.

  op                        output dtype                        gradients
  layer_norm(x, w, b)       y: ac, else x.dtype (the LayerNorm  dx: x.dtype, dw: w.dtype,
                            feeds a Linear: it writes the       db: b.dtype
                            autocast dtype itself, no cast)
  add_layer_norm(x, r, ..)  s = x + r: promote(x, r), rounded   dx: x.dtype, dr: r.dtype
                            as torch's add (the residual stream (the same fp32 values),
                            keeps its fp32); y: ac, else s.dtype dw, db as layer_norm
  bias_gelu(x, b)           x.dtype (elementwise: autocast      dx: x.dtype, db: b.dtype
                            leaves it alone, as F.gelu); the    (summed in fp32)
                            kernels add b in fp32, the
                            reference rounds b to x.dtype first
  attention, decode_attn.   q.dtype; inputs taken as given      dq, dk, dv: own dtypes
                            (from a Linear they already are ac);
                            scores and softmax fp32 (this
                            reference turns autocast off inside)
  softmax_cross_entropy     () fp32                             dlogits: logits.dtype
  lm_head_cross_entropy     () fp32; the logits matmuls run in  dh: h.dtype, dw: w.dtype;
                            matmul_dtype(h, w) = ac, else       the fused kernels add dw
                            promote(h, w), as autocast's matmul up in fp32 over row chunks

With upcast=True everything runs in float64 and autocast is not consulted.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast computes in on device_type, or None when it is off there.
    torch.compile folds both calls into guarded constants: no graph break."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def layer_norm_out_dtype(x: Tensor, residual: Optional[Tensor] = None) -> torch.dtype:
    """The dtype a LayerNorm of x (or of x + residual) writes: the autocast dtype when autocast
    is on, else x's (the wider of x's and residual's)."""
    ac = autocast_dtype(x.device.type)
    if ac is not None:
        return ac
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def matmul_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype a @ b runs in: the autocast dtype when autocast is on, else promote(a, b)."""
    ac = autocast_dtype(a.device.type)
    return torch.promote_types(a.dtype, b.dtype) if ac is None else ac


def _autocast_off(device_type: str):
    """A context without autocast, for math whose precision this module fixes itself."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _up(t: Optional[Tensor], upcast: bool) -> Optional[Tensor]:
    return t.double() if (upcast and t is not None and t.is_floating_point()) else t


def layer_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5, upcast: bool = False) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, statistics in fp32.
    y is in layer_norm_out_dtype(x) (the autocast dtype under autocast)."""
    out_dtype = torch.float64 if upcast else layer_norm_out_dtype(x)
    x, weight, bias = _up(x, upcast), _up(weight, upcast), _up(bias, upcast)
    xf = x if x.dtype == torch.float64 else x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def add_layer_norm_ref(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float = 1e-5,
                       upcast: bool = False) -> tuple[Tensor, Tensor]:
    """The block's `x = x + branch; h = ln(x)`: returns (s, y) with s = x + residual, y = LN(s).
    s keeps the wider of the two dtypes (the fp32 residual stream under autocast)."""
    x, residual = _up(x, upcast), _up(residual, upcast)
    s = x + residual
    return s, layer_norm_ref(s, weight, bias, eps, upcast)


def bias_gelu_ref(x: Tensor, bias: Optional[Tensor], upcast: bool = False) -> Tensor:
    """GPT-2's tanh GELU of (x + bias): 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    x, bias = _up(x, upcast), _up(bias, upcast)
    u = x if bias is None else x + bias.to(x.dtype)
    return F.gelu(u, approximate="tanh")


def _causal_keep(tq: int, tk: int, device) -> Tensor:
    """(tq, tk) bool: query i sees key j <= i + (tk - tq) (aligned bottom-right, as flash-attn)."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
                  scale: Optional[float] = None, upcast: bool = False) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v. q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D)."""
    q, k, v = _up(q, upcast), _up(k, upcast), _up(v, upcast)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = q.dtype if upcast else torch.float32
    with _autocast_off(q.device.type):  # fp32 scores under autocast too, as the kernels
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale    # (B, H, Tq, Tk)
        if causal:
            s = s.masked_fill(~_causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, p=dropout_p)
        return torch.matmul(p, v.to(acc)).to(q.dtype)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor,
                         kv_start: Optional[Tensor] = None, scale: Optional[float] = None,
                         upcast: bool = False) -> Tensor:
    """Attention of Tq new queries against a static KV cache.

    q (B, H, Tq, D); k_cache, v_cache (B, H, S, D); kv_len (B,) int: entries [0, kv_len) are
    written, and the Tq queries sit at cache slots kv_len - Tq .. kv_len - 1; kv_start (B,) int
    or None: slots before it are left padding. Query i of sequence b sees slot j iff
    kv_start[b] <= j <= kv_len[b] - Tq + i. A query that sees nothing gets zeros.
    """
    q, k_cache, v_cache = _up(q, upcast), _up(k_cache, upcast), _up(v_cache, upcast)
    B, H, Tq, D = q.shape
    S = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    j = torch.arange(S, device=q.device)[None, None, :]                   # (1, 1, S)
    i = torch.arange(Tq, device=q.device)[None, :, None]                  # (1, Tq, 1)
    last = kv_len.to(q.device).long()[:, None, None] - Tq + i             # (B, Tq, 1)
    keep = j <= last
    if kv_start is not None:
        keep = keep & (j >= kv_start.to(q.device).long()[:, None, None])
    acc = q.dtype if upcast else torch.float32
    with _autocast_off(q.device.type):
        s = torch.matmul(q.to(acc), k_cache.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, S)
        s = s.masked_fill(~keep[:, None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        return torch.matmul(p, v_cache.to(acc)).to(q.dtype)


def softmax_cross_entropy_ref(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                              upcast: bool = False) -> Tensor:
    """Mean over non-ignored rows of -log softmax(logits)[target]. logits (N, V), targets (N,)."""
    logits = _up(logits, upcast)
    return F.cross_entropy(logits if upcast else logits.float(), targets, ignore_index=ignore_index)


def lm_head_cross_entropy_ref(hidden: Tensor, weight: Tensor, targets: Tensor,
                              ignore_index: int = -100, vocab_size: Optional[int] = None,
                              upcast: bool = False) -> Tensor:
    """The LM head fused with cross-entropy: CE(hidden @ weight[:vocab_size].T, targets).

    hidden (N, C), weight (V_padded, C) (the tied embedding), targets (N,) int64.
    Rows of weight at or past vocab_size (a padded vocabulary) are not part of the softmax.
    The matmul runs in matmul_dtype(hidden, weight): the autocast dtype under autocast.
    """
    if vocab_size is not None:
        weight = weight[:vocab_size]
    dtype = torch.float64 if upcast else matmul_dtype(hidden, weight)
    logits = hidden.to(dtype) @ weight.to(dtype).t()                    # (N, V)
    return softmax_cross_entropy_ref(logits, targets, ignore_index, upcast)

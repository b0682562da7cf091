"""Attention backward by torch SDPA: the forward is recomputed under autograd and differentiated.

    dq, dk, dv = vjp(scaled_dot_product_attention(q, k, v, causal, scale))(dO)     (torch.func.vjp)

The "sdpa" side of choices.choice("attention_bwd"): on CUDA torch picks its fastest backward
(cuDNN, flash or memory-efficient) for the shapes and dtype, so one GPU run can compare it with
our Triton backwards. It pays one extra forward (SDPA's backward needs its own saved statistics,
which our forward does not produce) and cannot reproduce our Philox dropout mask; the caller
uses the Triton backward for dropout and for causal Tq > Tk (queries without keys, which SDPA
turns into NaN). Causal with Tq < Tk uses torch's bottom-right causal bias, as our kernels do.
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def sdpa_supports(causal: bool, dropout_p: float, Tq: int, Tk: int) -> bool:
    """Whether the SDPA backward computes what our forward did (see the module comment)."""
    return dropout_p == 0.0 and not (causal and Tq > Tk)


def attention_bwd_sdpa(do: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Fill dq, dk, dv (q's shape / k's shape, any strides) with SDPA's gradients for dO = do."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = causal_lower_right(Tq, Tk) if causal and Tq != Tk else None

    def forward(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale)

    # torch.func.vjp, not torch.autograd.grad: this runs inside a custom op's kernel, below the
    # autograd dispatch keys, where autograd records nothing; functorch's transform does
    _, vjp = torch.func.vjp(forward, q, k, v)
    gq, gk, gv = vjp(do)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)

"""The flash-attention tolerance scheme, shared by every kernel test.

A kernel's error against the float64 reference (`<op>_ref(..., upcast=True)`) must be at most
FACTOR x the error of plain torch in the kernel's own dtype (`<op>_ref(...)`) + a small atol.
"""
from __future__ import annotations

import torch

FACTOR = 2.0
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def assert_close_to_ref(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, name: str = "output",
                        atol: float | None = None, factor: float = FACTOR) -> None:
    """out: the kernel's result; ref_hi: float64 reference; ref_lo: reference in out's dtype."""
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element was never written?)"
    atol = ATOL.get(out.dtype, 1e-5) if atol is None else atol
    err = (out.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    base = (ref_lo.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * base + atol, (
        f"{name}: max error {err:.3e} vs float64 reference exceeds {factor} x torch's {base:.3e} "
        f"+ atol {atol:.1e} ({out.dtype})")


def assert_close_triton(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, name: str = "output") -> None:
    """assert_close_to_ref for Triton kernel outputs. Under the Triton interpreter (CPU) bf16
    stores truncate instead of rounding to nearest (triton/runtime/interpreter.py create_fp_trunc),
    so there the atol also allows one bf16 ulp of the largest reference value. GPUs round: strict."""
    atol = None
    if out.dtype == torch.bfloat16 and out.device.type == "cpu" and out.numel():
        atol = ATOL[torch.bfloat16] + ref_hi.abs().max().item() * 2.0 ** -7
    assert_close_to_ref(out, ref_hi, ref_lo, name, atol=atol)

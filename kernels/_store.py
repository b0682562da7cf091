"""The cast in front of a store, rounding to nearest like a GPU under the Triton interpreter too.

Triton's interpreter (TRITON_INTERPRET=1, how CI runs the kernels on CPU) casts fp32 -> bf16 by
truncating (triton/runtime/interpreter.py create_fp_trunc) where GPUs round to nearest even.
Truncation is biased towards zero, and downstream sums (a Linear's weight gradient over every
row) add the bias up, so CPU tests of a model built from these kernels would see errors a GPU
never makes. `cast_for_store(x, P)` is `x.to(P.dtype.element_ty)`, and under the interpreter
rounds bf16 to nearest first (kernels/_attention_common.py `_round_bf16_interp`). Compiled
kernels get the plain cast: which body is defined is decided once, at import.
"""
import triton
import triton.language as tl

from ._attention_common import INTERPRET, _round_bf16_interp

if INTERPRET:
    @triton.jit
    def cast_for_store(x, P):
        """x as P's element type, bf16 rounded to nearest even (the interpreter truncates)."""
        if P.dtype.element_ty == tl.bfloat16:
            x = _round_bf16_interp(x.to(tl.float32))
        return x.to(P.dtype.element_ty)
else:
    @triton.jit
    def cast_for_store(x, P):
        """x as P's element type (GPUs round to nearest)."""
        return x.to(P.dtype.element_ty)

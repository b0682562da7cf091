"""torch.library registration shared by the Triton kernel files (namespace "gpt2_fast_triton").

Each kernel file registers its host launchers (`<op>_fwd`, `<op>_bwd`) with `triton_op` and
launches its @triton.jit kernels through `launch(kernel)[grid](...)` inside them. Ops registered
with torch.library.triton_op get their fake (meta) implementation by tracing the launcher with
fake tensors, in which `wrap_triton` launches nothing, so torch.compile and CUDA graphs see
through them without a hand-written register_fake. The autograd.Function of each op calls the
registered ops: dynamo traces the Function, inductor sees the kernels.

Under TRITON_INTERPRET=1 (CPU tests) the kernels are plain Python that reads real data pointers,
so there `triton_op` registers an opaque custom op instead: its fake implementation is the launcher
run on fake tensors with the launches skipped, and torch.compile (aot_eager, inductor) calls the
real op at run time. The compiled graph is the same op-for-op; only inductor's view into the
Triton kernels is lost, which the interpreter cannot give anyway.

Kept small and stable: the attention kernel files import `triton_op`, `launch`, `num_programs`.
"""
import os
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

NAMESPACE = "gpt2_fast_triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # as Triton reads it when @triton.jit runs


def triton_op(name: str, mutates_args=()) -> Callable:
    """Decorator: register `fn` as torch.ops.gpt2_fast_triton.<name> (schema from type hints).

    The decorated function must take and return tensors (or tuples of them), allocate its outputs
    and never return a view of an input.
    """
    if INTERPRET:
        def register(fn: Callable):
            op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
            op.register_fake(fn)  # launch() skips the kernels on fake tensors
            return op
        return register
    return torch.library.triton_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)


def launch(kernel):
    """The launchable form of a @triton.jit kernel inside a triton_op: `launch(k)[grid](...)`.

    Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction, which wrap_triton cannot
    trace (and older torch rejects): it is launched as is, except on fake tensors (a fake
    implementation or torch.compile tracing), where nothing is launched, as wrap_triton does.
    """
    if isinstance(kernel, JITFunction):
        return wrap_triton(kernel)
    return _Interpreted(kernel)


class _Interpreted:
    """`kernel[grid](*args)` of an interpreted kernel that does nothing when an argument is fake."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def call(*args, **kwargs):
            if any(isinstance(a, FakeTensor) for a in (*args, *kwargs.values())):
                return None
            return run(*args, **kwargs)
        return call


def num_programs(device: torch.device, per_sm: int = 4, cpu: int = 4) -> int:
    """Program count for persistent grids (programs loop over row tiles): per_sm x the SM count on
    CUDA, `cpu` under the interpreter (fewer programs interpret faster)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return cpu


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless t is a float32/float16/bfloat16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Raise ValueError if any tensor in others (name=tensor or None) is not on ref's device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"expected all on one device")


def rows_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (..., n) as a (rows, n) tensor with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < n):
        t2 = t2.contiguous()
    return t2

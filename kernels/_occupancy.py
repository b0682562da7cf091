"""Persistent-grid sizes from the real occupancy of the compiled kernel.

A persistent kernel (each program walks a range of row tiles) wants exactly as many programs as
fit on the GPU at once: fewer leave SMs idle, more run as a second, partial wave. How many CTAs
of a kernel fit on one SM depends on its compiled registers per thread and shared memory per
block, which only the compiler knows. `resident_programs(kernel, args, kwargs, device)`:

  * on CUDA: compiles the launch (JITFunction.warmup: same specialisation and constexprs as the
    launch that follows, so the launch hits Triton's cache), reads n_regs and metadata.shared,
    and returns ctas_per_sm(...) x SM count; cached per (kernel, constexprs, dtypes, device);
  * while tracing (torch.compile: fake or functional tensors, which have no data to compile
    against): the cached value when the same launch already ran eagerly, else the fixed
    fallback (2 per SM: what the GPT-2-width backward kernels get on sm_90);
  * elsewhere (the interpreter on CPU): `cpu` programs (fewer programs interpret faster).

ctas_per_sm follows the CUDA occupancy calculator: registers are allocated per warp in units of
256 (n_regs rounded up to 8 per thread), shared memory per block plus 1 KB the driver reserves,
at most 2048 threads and 32 blocks per SM. Device limits come from torch's device properties
when present, else sm_90's (65536 registers, 228 KB shared memory per SM).
"""
import torch
from torch._subclasses.fake_tensor import is_fake

from ._registry import INTERPRET

SM90_LIMITS = {"regs": 65536, "smem": 233472, "threads": 2048, "blocks": 32}
_CACHE: dict = {}


def ctas_per_sm(n_regs: int, shared: int, num_warps: int, limits: dict = SM90_LIMITS) -> int:
    """CTAs of a kernel (n_regs per thread, `shared` bytes per block, num_warps) resident per SM."""
    regs_per_warp = -(-max(1, n_regs) * 32 // 256) * 256
    by_regs = (limits["regs"] // regs_per_warp) // num_warps
    by_threads = limits["threads"] // (32 * num_warps)
    by_smem = limits["smem"] // (shared + 1024) if shared > 0 else limits["blocks"]
    return max(1, min(by_regs, by_threads, by_smem, limits["blocks"]))


def _device_limits(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {"regs": getattr(p, "regs_per_multiprocessor", SM90_LIMITS["regs"]),
            "smem": getattr(p, "shared_memory_per_multiprocessor", SM90_LIMITS["smem"]),
            "threads": getattr(p, "max_threads_per_multi_processor", SM90_LIMITS["threads"]),
            "blocks": SM90_LIMITS["blocks"]}


def _real(a) -> bool:
    """A tensor with data (not a fake, functional or other tensor subclass seen while tracing)."""
    if not isinstance(a, torch.Tensor):
        return True
    return type(a) in (torch.Tensor, torch.nn.Parameter) and not is_fake(a)


def _key(kernel, args, kwargs, device) -> tuple:
    sig = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
    return (kernel, sig, tuple(sorted(kwargs.items())), device.index)


def resident_programs(kernel, args: tuple, kwargs: dict, device: torch.device,
                      fallback_per_sm: int = 2, cpu: int = 4) -> int:
    """Programs of `kernel[grid](*args, **kwargs)` that fit on `device` at once (see module doc)."""
    if device.type != "cuda" or INTERPRET:
        return cpu
    key = _key(kernel, args, kwargs, device)
    per_sm = _CACHE.get(key)
    if per_sm is None:
        if torch.compiler.is_compiling() or not all(_real(a) for a in args):
            per_sm = fallback_per_sm
        else:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            if getattr(compiled, "n_regs", None) is None:
                compiled._init_handles()
            per_sm = ctas_per_sm(compiled.n_regs, compiled.metadata.shared,
                                 compiled.metadata.num_warps, _device_limits(device))
            _CACHE[key] = per_sm
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count

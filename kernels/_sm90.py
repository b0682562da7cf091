"""sm_90 (H100/H200) as a compile target on a machine without a GPU: the target, one block's
shared-memory limit, the compiled-kernel cache, and a kernel's resources read from its cubin.

The one place for what kernels/flash_attention_sm90.py (every attention config from hand-built
signatures, pruned ones and other head dims included) and tests/sm90_compile.py (every kernel from
its real, intercepted launches) both need; neither imports the other. Imports only the standard
library at import time (triton when called), so the pruner can take SMEM_LIMIT from here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

TARGET = ("cuda", 90, 32)   # GPUTarget(backend, arch, warp size)
SMEM_LIMIT = 232448         # bytes of shared memory one block may use on sm_90 (227 KB); sm_80 163 KB, sm_89 99 KB


def gpu_target():
    """triton's GPUTarget for sm_90."""
    from triton.backends.compiler import GPUTarget
    return GPUTarget(*TARGET)


def compile_defaults() -> None:
    """The environment both tools compile in, where it does not say otherwise: FP fusion on
    (triton 3.9 warns when TRITON_DEFAULT_FP_FUSION is unset; 1 is 3.6's default), and
    TRITON_CACHE_DIR a folder per triton version under ~/.cache/gpt2_fast, so a rerun with
    unchanged kernels compiles nothing and two tritons never share a cache. Triton reads both
    when it compiles, so this may run after `import triton`."""
    import triton
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(
        os.path.expanduser("~/.cache/gpt2_fast"), f"sm90-triton-{triton.__version__}"))


def cuobjdump_path() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for p in (bundled, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if p and os.access(p, os.X_OK):
            return p
    raise FileNotFoundError("no cuobjdump (triton's backends/nvidia/bin, PATH or /usr/local/cuda/bin)")


def read_cubin(cubin: bytes, tool: str) -> dict:
    """{regs, stack, spill_stores, spill_loads} of the one kernel in a cubin: registers and stack
    frame bytes (cuobjdump -res-usage), spill instructions (STL / LDL in the SASS: Triton kernels
    keep nothing else in local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    return {"regs": int(reg.group(1)) if reg else -1, "stack": int(stack.group(1)) if stack else -1,
            "spill_stores": len(re.findall(r"\bSTL(?:\.\w+)*\s", sass)),
            "spill_loads": len(re.findall(r"\bLDL(?:\.\w+)*\s", sass))}

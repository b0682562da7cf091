"""The extension's source lists and flags, shared by setup.py and the JIT build in extension.py.

gpt2_fast._C is built from csrc/ (at the repository top level, next to gpt2_fast/):
  csrc/bindings.cpp + csrc/cpu/*.cpp         always (CPU kernels, OpenMP where the compiler has it)
  csrc/*.cu                                  when torch has CUDA and nvcc is found (CUDA_HOME)
Environment:
  GPT2_FAST_SKIP_EXT=1       no extension at all (setup.py)
  GPT2_FAST_NO_CUDA=1        build the CPU kernels only, even where CUDA is there
  GPT2_FAST_CUDA_ARCHS       e.g. "8.0;9.0" (the default; TORCH_CUDA_ARCH_LIST is used when this is
                             unset and it is set); SASS for each, PTX for the newest ("+PTX" is implied)
  MAX_JOBS                   parallel compile jobs; default from cores and free memory
This file must import without torch's extension machinery being importable at module level
(setup.py imports it by path), so torch is imported inside the functions.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

EXT_NAME = "gpt2_fast._C"
JIT_NAME = "gpt2_fast_C"
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def csrc_dir(root: Optional[str] = None) -> Optional[str]:
    """The csrc/ folder: <root>/csrc, else next to this package (editable install / repo checkout),
    else inside it (package_data of a wheel). None when no copy is found."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = ([os.path.join(root, "csrc")] if root else []) + [
        os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bindings.cpp")):
            return c
    return None


def cpu_sources(csrc: str) -> list[str]:
    cpu = os.path.join(csrc, "cpu")
    return [os.path.join(csrc, "bindings.cpp")] + sorted(
        os.path.join(cpu, f) for f in os.listdir(cpu) if f.endswith(".cpp"))


def cuda_sources(csrc: str) -> list[str]:
    return sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith(".cu"))


def cuda_build_reason() -> Optional[str]:
    """None when the CUDA sources can be built here, else why not."""
    if os.environ.get("GPT2_FAST_NO_CUDA") == "1":
        return "GPT2_FAST_NO_CUDA=1"
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def cuda_archs() -> list[str]:
    spec = os.environ.get("GPT2_FAST_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    archs = [a.strip().replace("+PTX", "") for a in spec.replace(",", ";").replace(" ", ";").split(";")]
    archs = [a for a in archs if a]
    for a in archs:
        major, _, minor = a.partition(".")
        if not (major.isdigit() and minor.rstrip("af").isdigit()):
            raise ValueError(f"GPT2_FAST_CUDA_ARCHS: expected entries like 8.0 or 9.0a, got {a!r} in {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, PTX for the newest (so newer GPUs can JIT it)."""
    flags = []
    for i, a in enumerate(archs):
        num = a.replace(".", "")
        code = f"[sm_{num},compute_{num}]" if i == len(archs) - 1 else f"sm_{num}"
        flags.append(f"-gencode=arch=compute_{num},code={code}")
    return flags


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    return [], []  # macOS clang has no -fopenmp by default: the kernels then run on one thread


def compile_args(with_cuda: bool, archs: Optional[list[str]] = None) -> tuple[dict, list[str], list[str]]:
    """(extra_compile_args, extra_link_args, define_macros as -D flags for the JIT)."""
    omp_c, omp_l = _openmp_flags()
    # -std is left to torch (c++17 for older torch, c++20 for torch >= 2.10, whose headers need it).
    # -fno-trapping-math / -fno-math-errno (as torch's own build): lets the CPU loops vectorize
    cxx = ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math"] + omp_c
    args = {"cxx": cxx}
    defines = []
    if with_cuda:
        defines.append("-DGPT2_FAST_WITH_CUDA")
        args["cxx"] = cxx + ["-DGPT2_FAST_WITH_CUDA"]
        # No --use_fast_math: it would turn every tanhf into tanh.approx (MUFU.TANH, ~5e-4 relative
        # error: the GELU kernels promise accurate tanh), divisions and sqrt into approximations, and
        # flush denormals (-ftz) in every kernel. A kernel that wants an approximate intrinsic calls
        # it by name (__expf, __fdividef, ...). .ci/cuda_compile_check.sh checks the SASS for this.
        args["nvcc"] = ["-O3", "-Xcompiler", "-g0", "-DGPT2_FAST_WITH_CUDA",
                        "--expt-relaxed-constexpr"] + gencode_flags(archs or cuda_archs())
    return args, omp_l, defines


def default_max_jobs() -> int:
    """Compile jobs: one per core, at most one per 2 GiB of available memory (nvcc is hungry)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_mem = max(1, avail_kib // (2 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_mem = cores
    return max(1, min(cores, by_mem))


def extension_modules(root: str) -> list:
    """[CppExtension or CUDAExtension for gpt2_fast._C], or [] when there are no sources."""
    csrc = csrc_dir(root)
    if csrc is None:
        return []
    from torch.utils.cpp_extension import CppExtension, CUDAExtension
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    why_not_cuda = cuda_build_reason()
    with_cuda = why_not_cuda is None
    print(f"gpt2_fast: building {EXT_NAME} with CPU kernels"
          + (" and CUDA kernels (archs " + ";".join(cuda_archs()) + ")" if with_cuda
             else f" only (no CUDA: {why_not_cuda})"), file=sys.stderr)
    args, link, _ = compile_args(with_cuda)
    rel = lambda p: os.path.relpath(p, root)  # setuptools wants paths relative to setup.py
    sources = [rel(p) for p in cpu_sources(csrc)]
    if with_cuda:
        sources += [rel(p) for p in cuda_sources(csrc)]
        return [CUDAExtension(EXT_NAME, sources, extra_compile_args=args, extra_link_args=link)]
    return [CppExtension(EXT_NAME, sources, extra_compile_args=args, extra_link_args=link)]


def jit_build(verbose: bool = False):
    """Build and import the extension with torch.utils.cpp_extension.load (ninja), cached under
    ~/.cache/gpt2_fast/<torch version>-<cuda|cpu>; returns the loaded module. Raises on failure."""
    csrc = csrc_dir()
    if csrc is None:
        raise FileNotFoundError("the C++/CUDA sources (csrc/) were not found next to or inside gpt2_fast/")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on PATH via its bin dir)
        except ImportError as e:
            raise RuntimeError("the JIT build needs ninja (pip install ninja)") from e
    import torch
    from torch.utils.cpp_extension import load
    with_cuda = cuda_build_reason() is None
    archs = None
    if with_cuda and not (os.environ.get("GPT2_FAST_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")) \
            and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}.{minor}"]  # JIT: only this machine's GPU (a third of the compile time)
    args, link, _ = compile_args(with_cuda, archs)
    tag = (f"torch{torch.__version__.replace('+', '_')}-"
           + ("cuda-sm" + "_".join(a.replace(".", "") for a in (archs or cuda_archs())) if with_cuda else "cpu"))
    build_dir = os.path.join(os.path.expanduser(os.environ.get("GPT2_FAST_CACHE", "~/.cache/gpt2_fast")),
                             "ext", tag)
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    sources = cpu_sources(csrc) + (cuda_sources(csrc) if with_cuda else [])
    return load(name=JIT_NAME, sources=sources, extra_cflags=args["cxx"],
                extra_cuda_cflags=args.get("nvcc"), extra_ldflags=link, build_directory=build_dir,
                with_cuda=with_cuda, verbose=verbose)

"""Builds gpt2_fast (+ gpt2_fast.kernels from kernels/) and the extension gpt2_fast._C from csrc/.

Environment:
  GPT2_FAST_SKIP_EXT=1     pure-Python install (no extension)
  GPT2_FAST_CUDA_ARCHS     CUDA arch list, default "8.0;9.0" (PTX for the newest)
  MAX_JOBS                 parallel compile jobs (default: from cores and free memory)
The CPU C++ sources are always built; the CUDA sources when torch has CUDA and nvcc is found.

Every build copies csrc/ into the package as gpt2_fast/csrc (build_py below), so an installed
wheel carries the sources the JIT fallback (GPT2_FAST_JIT=1, gpt2_fast/build_ext.py) compiles,
and writes gpt2_fast/_build_info.json saying whether the extension was built or why it was
skipped; `gpt2-fast info` prints it. A skipped extension is announced with a WARNING banner
(pip shows it with -v; `gpt2-fast info` always does).
"""
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIPPED = None  # why the extension is not built, or None


def _skip(reason: str):
    global SKIPPED
    SKIPPED = reason
    bar = "=" * 78
    print(f"\n{bar}\nWARNING: gpt2_fast is being installed WITHOUT its compiled extension: {reason}.\n"
          f"The cpp/cuda kernel backends will be unavailable (the torch/Triton ones still work).\n"
          f"Build it: pip install --no-build-isolation .  or compile on first use: GPT2_FAST_JIT=1\n{bar}\n",
          file=sys.stderr)
    return [], {}


class BuildPyWithSources(build_py):
    """build_py, plus csrc/ copied to gpt2_fast/csrc and gpt2_fast/_build_info.json written."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ and the repository in place
        pkg = os.path.join(self.build_lib, "gpt2_fast")
        src = os.path.join(ROOT, "csrc")
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(pkg, "csrc"), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__", ".*"))
        with open(os.path.join(pkg, "_build_info.json"), "w") as f:
            json.dump({"extension": "skipped" if SKIPPED else "built", "reason": SKIPPED}, f)


def _ext_modules():
    if os.environ.get("GPT2_FAST_SKIP_EXT") == "1":
        return _skip("GPT2_FAST_SKIP_EXT=1")
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        return _skip("torch is not importable in the build environment (install torch first, then "
                     "pip install --no-build-isolation .)")
    sys.path.insert(0, os.path.join(ROOT, "gpt2_fast"))
    try:
        from build_ext import extension_modules  # gpt2_fast/build_ext.py: shared with the JIT path
    finally:
        sys.path.pop(0)
    exts = extension_modules(ROOT)
    if not exts:
        return _skip("the C++ sources (csrc/) were not found")
    from torch.utils.cpp_extension import BuildExtension

    class AtomicBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """`build_ext --inplace` writes gpt2_fast/_C*.so to a temporary file and renames it over the
        old one: copying into the old file in place rewrote a library that running processes
        had mapped, and they crashed (SIGBUS / SIGSEGV)."""

        def copy_file(self, infile, outfile, *args, **kwargs):
            if os.path.isdir(outfile) or not outfile.endswith((".so", ".pyd", ".dylib")):
                return super().copy_file(infile, outfile, *args, **kwargs)
            tmp = f"{outfile}.tmp-{os.getpid()}"
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            os.replace(tmp, outfile)
            return outfile, copied

    return exts, {"build_ext": AtomicBuildExtension}


ext_modules, cmdclass = _ext_modules()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    name="gpt2_fast",
    version="0.1.0",
    description="GPT-2 with fused Triton and CUDA kernels: train and serve fast on one GPU, run anywhere",
    packages=["gpt2_fast", "gpt2_fast.kernels", "gpt2_fast.benchmarks"],
    package_dir={"gpt2_fast": "gpt2_fast", "gpt2_fast.kernels": "kernels"},
    package_data={"gpt2_fast": ["data/*"]},  # csrc/ is copied in by BuildPyWithSources
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tiktoken>=0.6", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers", "huggingface_hub"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "dev": ["pytest", "transformers", "huggingface_hub", "pytest-benchmark", "matplotlib"],
        "peers": ["onnxruntime", "onnx", "ctranslate2", "transformers"],  # bench/cpu_decode_peers.py
    },
    entry_points={"console_scripts": ["gpt2-fast=gpt2_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

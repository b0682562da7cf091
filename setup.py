"""Builds gpt2_fast (+ gpt2_fast.kernels from kernels/) and the extension gpt2_fast._C from csrc/.

Environment:
  GPT2_FAST_SKIP_EXT=1     pure-Python install (no extension)
  GPT2_FAST_CUDA_ARCHS     CUDA arch list, default "8.0;9.0" (PTX for the newest)
  MAX_JOBS                 parallel compile jobs (default: from cores and free memory)
The CPU C++ sources are always built; the CUDA sources when torch has CUDA and nvcc is found.
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("GPT2_FAST_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError:
        print("gpt2_fast: torch is not importable in the build environment; installing without the "
              "extension (use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    sys.path.insert(0, os.path.join(ROOT, "gpt2_fast"))
    try:
        from build_ext import extension_modules  # gpt2_fast/build_ext.py: shared with the JIT path
    finally:
        sys.path.pop(0)
    exts = extension_modules(ROOT)
    if not exts:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="gpt2_fast",
    version="0.1.0",
    description="GPT-2 with fused Triton and CUDA kernels: train and serve fast on one GPU, run anywhere",
    packages=["gpt2_fast", "gpt2_fast.kernels", "gpt2_fast.benchmarks"],
    package_dir={"gpt2_fast": "gpt2_fast", "gpt2_fast.kernels": "kernels"},
    package_data={"gpt2_fast": ["data/*", "csrc/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tiktoken>=0.6", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers", "huggingface_hub"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "dev": ["pytest", "transformers", "huggingface_hub", "pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["gpt2-fast=gpt2_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""gpt2_fast: GPT-2 with fused Triton / CUDA kernels; trains and serves on one GPU, runs on CPU.

    import gpt2_fast
    model = gpt2_fast.GPT.from_pretrained("/path/to/gpt2")     # HF checkpoint directory
    print(gpt2_fast.generate(model, "Hello, I'm a language model,", max_new_tokens=30).texts[0])
"""
from .config import PRESETS, GPTConfig
from .engine import Engine
from .generate import GenerationResult, generate, sample_logits, stream
from .hf_patch import patch_hf  # noqa: F401  (imports transformers/triton only when called)
from .model import GPT
from .quant import quantize_int8
from .speculative import speculative_generate
from .tokenizer import Tokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = ["Engine", "GPT", "GPTConfig", "PRESETS", "GenerationResult", "Tokenizer", "generate",
           "get_tokenizer", "patch_hf", "quantize_int8", "sample_logits", "speculative_generate", "stream",
           "__version__"]

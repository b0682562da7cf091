"""`gpt2-fast generate`: stream a continuation of --prompt to stdout."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --config / --device / --dtype, shared by the commands that load a model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF GPT-2 checkpoint directory, our training checkpoint "
                                     "(.pt), or a preset name fetched from the HF hub")
    src.add_argument("--config", help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) with random weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default=None, help="kernel backend: auto, torch, triton, cuda, cpp")


def load_model(args):
    """The model described by add_model_arguments' flags, on its device, in eval mode."""
    from .config import GPTConfig
    from .model import GPT
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.config:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name(args.config))
    elif args.model.endswith(".pt"):
        from .checkpoint import load_model_from_checkpoint
        model = load_model_from_checkpoint(args.model)
    else:
        model = GPT.from_pretrained(args.model)
    if args.backend:
        model.set_backend(args.backend)
    return model.to(device=device, dtype=dtype).eval()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="do not print timings to stderr")


def run(args) -> int:
    from .generate import stream
    model = load_model(args)
    timings: dict = {}
    sys.stdout.write(args.prompt)
    for piece in stream(model, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, timings=timings):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet and timings.get("decode_steps"):
        ms = timings["decode_s"] / timings["decode_steps"] * 1e3
        print(f"[{model.config.n_layer}x{model.config.n_embd} on {next(model.parameters()).device}: "
              f"time to first token {timings['ttft_s'] * 1e3:.1f} ms, {ms:.2f} ms/token, "
              f"{1e3 / ms:.1f} tokens/s]", file=sys.stderr)
    return 0

"""`gpt2-fast generate`: stream a continuation of --prompt to stdout.

Also the model flags every model-loading command shares (add_model_arguments / load_model):
--model is anything gpt2_fast.load.load_model reads (HF folder, .pt, training output folder,
preset). Flags are checked before any model is loaded, so a typo costs no loading time.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

DEFAULT_NEW_TOKENS = 100
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --config / --device / --dtype, shared by the commands that load a model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF GPT-2 checkpoint folder, a training checkpoint (.pt), a training "
                                     "output folder (its latest ckpt_*.pt), or a preset name (HF hub)")
    src.add_argument("--config", help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) with random weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default=None, help="kernel backend: auto, torch, triton, cuda, cpp")


def check_model_arguments(args) -> torch.device:
    """Validate --device / --backend / --config before anything is loaded; returns the device."""
    from .config import BACKENDS, PRESETS
    from .devices import parse_device
    device = parse_device(args.device)
    if args.backend is not None and args.backend not in BACKENDS:
        raise ValueError(f"--backend expects one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.config is not None and args.config not in PRESETS:
        raise ValueError(f"--config expects one of {', '.join(PRESETS)}, got {args.config!r}")
    return device


def load_model(args):
    """The model described by add_model_arguments' flags, on its device, in eval mode."""
    from .config import GPTConfig
    from .load import load_model as load
    from .model import GPT
    device = check_model_arguments(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.config:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name(args.config))
    else:
        model = load(args.model)
    if args.backend:
        model.set_backend(args.backend)
    return model.to(device=device, dtype=dtype).eval()


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def finite_float(text: str) -> float:
    """argparse type: a finite float (no nan / inf)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, clipped to what fits the "
                        f"model's block size after the prompt)")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=finite_float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="do not print timings to stderr")
    fast = p.add_argument_group("decode engine")
    fast.add_argument("--int8", action="store_true",
                      help="int8 weight-only quantization (per-channel scales) of the projections and LM head")
    fast.add_argument("--draft-model", default=None,
                      help="speculative decoding (greedy): a smaller model (HF directory, .pt, or preset "
                           "name) drafts --speculate-k tokens that this model verifies in one forward")
    fast.add_argument("--draft-config", default=None,
                      help="a preset with random weights as the draft (testing)")
    fast.add_argument("--speculate-k", type=positive_int, default=4, help="tokens drafted per round (default 4)")
    fast.add_argument("--no-cuda-graph", action="store_true",
                      help="run the decode step eagerly on CUDA instead of replaying a CUDA graph")


def _load_draft(args, like):
    import argparse as _argparse
    ns = _argparse.Namespace(model=args.draft_model, config=args.draft_config, device=args.device,
                             dtype=args.dtype, backend=args.backend)
    draft = load_model(ns)
    if args.int8:
        from .quant import quantize_int8
        quantize_int8(draft)
    return draft


def check_sampling(args) -> None:
    """The sampling flags' values, before the model is loaded."""
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    from .load import resolve
    for flag, path in (("--model", args.model), ("--draft-model", args.draft_model)):
        if path is not None:
            try:
                resolve(path)  # cheap: the path exists and is something load_model reads
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{flag}: {e}") from None
    if args.draft_config is not None:
        from .config import PRESETS
        if args.draft_config not in PRESETS:
            raise ValueError(f"--draft-config expects one of {', '.join(PRESETS)}, got {args.draft_config!r}")


def fit_new_tokens(args, model) -> int:
    """--max-new-tokens, or the default clipped to the block size left after the prompt (said on
    stderr); an explicit value that does not fit is the engine's error."""
    from .generate import encode_prompts
    from .tokenizer import get_tokenizer
    n_prompt = len(encode_prompts(args.prompt, get_tokenizer(), model.config.vocab_size)[0])
    room = model.config.block_size - n_prompt
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if room < 1:
        raise ValueError(f"the prompt has {n_prompt} tokens, which leaves no room in the model's "
                         f"block_size {model.config.block_size}; shorten --prompt")
    if room < DEFAULT_NEW_TOKENS:
        if not args.quiet:
            print(f"[--max-new-tokens defaults to {DEFAULT_NEW_TOKENS}; clipped to {room}: the model's "
                  f"block_size is {model.config.block_size} and the prompt has {n_prompt} tokens]",
                  file=sys.stderr)
        return room
    return DEFAULT_NEW_TOKENS


def run(args) -> int:
    from .engine import get_engine
    from .generate import stream
    check_model_arguments(args)
    check_sampling(args)  # last: it also checks that --model / --draft-model exist
    model = load_model(args)
    args.max_new_tokens = fit_new_tokens(args, model)
    if args.int8:
        from .quant import quantize_int8
        quantize_int8(model)
    # a model loaded only to generate: on CPU its weights may take the faster GEMV layout
    get_engine(model, cuda_graph=False if args.no_cuda_graph else None, cpu_layout=True)
    if args.draft_model or args.draft_config:
        return _run_speculative(args, model)
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
        print(f"[{_describe(model, args)}: time to first token {timings['ttft_s'] * 1e3:.1f} ms, "
              f"{ms:.2f} ms/token, {1e3 / ms:.1f} tokens/s]", file=sys.stderr)
    return 0


def _describe(model, args) -> str:
    p = model.transformer.wte.weight
    graph = "eager" if args.no_cuda_graph or p.device.type != "cuda" else "CUDA graph"
    quant = ", int8" if args.int8 else ""
    return f"{model.config.n_layer}x{model.config.n_embd} {str(p.dtype).replace('torch.', '')}{quant} " \
           f"on {p.device}, {graph}"


def _run_speculative(args, model) -> int:
    import codecs

    from .generate import encode_prompts
    from .speculative import speculative_generate_ids
    from .tokenizer import EOT_TOKEN, get_tokenizer
    if args.temperature != 0 and not args.quiet:
        print("[speculative decoding is greedy: --temperature/--top-k/--top-p are ignored]", file=sys.stderr)
    draft = _load_draft(args, model)
    tok = get_tokenizer()
    ids = encode_prompts(args.prompt, tok, model.config.vocab_size)[0]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stats: dict = {}
    sys.stdout.write(args.prompt)
    for chunk in speculative_generate_ids(model, draft, ids, args.max_new_tokens, args.speculate_k,
                                          stop_at_eot=True, stats=stats):
        chunk = chunk[:chunk.index(EOT_TOKEN)] if EOT_TOKEN in chunk else chunk
        sys.stdout.write(decoder.decode(tok.decode_bytes(chunk)))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    if not args.quiet and stats.get("decode_tokens"):
        ms = stats["decode_s"] / stats["decode_tokens"] * 1e3
        print(f"[{_describe(model, args)}, speculative k={args.speculate_k} with a "
              f"{draft.config.n_layer}x{draft.config.n_embd} draft: time to first token "
              f"{stats['ttft_s'] * 1e3:.1f} ms, {ms:.2f} ms/token, {1e3 / ms:.1f} tokens/s, "
              f"acceptance {stats['acceptance_rate']:.0%} over {stats['rounds']} rounds]", file=sys.stderr)
    return 0

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
    fast = p.add_argument_group("decode engine")
    fast.add_argument("--int8", action="store_true",
                      help="int8 weight-only quantization (per-channel scales) of the projections and LM head")
    fast.add_argument("--draft-model", default=None,
                      help="speculative decoding (greedy): a smaller model (HF directory, .pt, or preset "
                           "name) drafts --speculate-k tokens that this model verifies in one forward")
    fast.add_argument("--draft-config", default=None,
                      help="a preset with random weights as the draft (testing)")
    fast.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per round (default 4)")
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


def run(args) -> int:
    from .engine import get_engine
    from .generate import stream
    model = load_model(args)
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

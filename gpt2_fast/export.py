"""`gpt2-fast export CKPT OUT_DIR`: a checkpoint as an HF folder that transformers loads offline.

CKPT is anything gpt2_fast.load.load_model reads (a .pt checkpoint, a training output folder,
whose latest checkpoint is taken, an HF folder or a preset). OUT_DIR receives config.json,
model.safetensors and GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so `AutoTokenizer.from_pretrained(OUT_DIR)` and
`GPT2LMHeadModel.from_pretrained(OUT_DIR)` work without the hub. Files already in OUT_DIR are
never replaced unless --overwrite is given, and nothing else there is touched.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from .hf import save_pretrained
from .tokenizer import N_VOCAB

OUTPUT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(src: str, out_dir: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> list[str]:
    """Write the model at `src` into out_dir as an HF folder; returns the files written."""
    from .load import load_model
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    clash = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if clash and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(clash)}; choose an empty folder or "
                              f"pass --overwrite to replace these files")
    if os.path.isdir(src) and os.path.abspath(src) == os.path.abspath(out_dir):
        raise ValueError(f"export into its own source folder {src}: choose another output folder")
    model = load_model(src, dtype=dtype)
    save_pretrained(model, out_dir)
    written = OUTPUT_FILES if model.config.vocab_size == N_VOCAB else OUTPUT_FILES[:2]
    return [os.path.join(out_dir, f) for f in written]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a training checkpoint (.pt), a training output folder (its latest ckpt_*.pt), "
                        "or an HF folder")
    p.add_argument("out", metavar="OUT_DIR", nargs="?", default=None,
                   help="the HF folder to write (created if missing); or give it as --out")
    p.add_argument("--out", dest="out_flag", metavar="OUT_DIR", default=None,
                   help="the same as OUT_DIR (the --out every command that writes takes)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="store the weights in this dtype (default: as in the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace config.json, model.safetensors and the tokenizer files if OUT_DIR has them")


def run(args) -> int:
    from .load import describe
    if (args.out is None) == (args.out_flag is None):
        raise ValueError("give the output folder once: `gpt2-fast export CKPT OUT_DIR` or `--out OUT_DIR`")
    args.out = args.out or args.out_flag
    source = describe(args.checkpoint)
    written = export(args.checkpoint, args.out, DTYPES[args.dtype] if args.dtype else None, args.overwrite)
    print(f"exported {source} -> {args.out} ({', '.join(os.path.basename(p) for p in written)})",
          file=sys.stderr)
    if len(written) < len(OUTPUT_FILES):
        print(f"note: vocab_size is not GPT-2's {N_VOCAB}: no tokenizer files written", file=sys.stderr)
    return 0

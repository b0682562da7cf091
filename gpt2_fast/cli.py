"""The `gpt2-fast` command (also `python -m gpt2_fast`).

Each subcommand lives in its own module that defines `add_arguments(parser)` and `run(args)`;
SUBCOMMANDS maps names to those modules, imported only when the subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "generate": ("gpt2_fast.cli_generate", "generate text from a checkpoint or a preset"),
    "info": ("gpt2_fast.cli", "device, versions and which kernel backends are usable here"),
    "bench": ("gpt2_fast.benchmarks.cli", "kernel, decode and train benchmarks (bench/README.md)"),
    "prepare": ("gpt2_fast.data", "tokenize text files into uint16 train/val token shards"),
    "train": ("gpt2_fast.train", "train or fine-tune GPT-2 (single process, or DDP / FSDP2 under torchrun)"),
    "eval": ("gpt2_fast.eval", "perplexity, LAMBADA accuracy and zero-shot tasks of a model"),
    "demo": ("gpt2_fast.demo", "prepare the bundled corpus, train a small GPT-2, evaluate, sample"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # `info` takes no arguments
    pass


def run(args) -> int:
    from .info import info_lines
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-fast", description="GPT-2 with fused Triton/CUDA kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"gpt2-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

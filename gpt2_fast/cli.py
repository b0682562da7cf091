"""The `gpt2-fast` command (also `python -m gpt2_fast`).

Each subcommand lives in its own module that defines `add_arguments(parser)` and `run(args)`;
SUBCOMMANDS maps names to those modules, imported only when the subcommand runs.

Errors: `main` is the one place that turns an exception into the user's error line
`gpt2-fast <cmd>: error: <message>` (exit 2). ValueError / TypeError / OSError / RuntimeError
are what our code raises for bad input, with a message naming the file or flag; anything else
is a bug, printed with its type and the hint below (exit 1). GPT2_FAST_DEBUG=1 re-raises, so the
full traceback shows.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "generate": ("gpt2_fast.cli_generate", "generate text from a checkpoint or a preset"),
    "info": ("gpt2_fast.cli", "device, versions and which kernel backends are usable here"),
    "bench": ("gpt2_fast.benchmarks.cli", "kernel, decode and train benchmarks (bench/README.md)"),
    "prepare": ("gpt2_fast.data_prepare", "tokenize text files into uint16 train/val token shards"),
    "train": ("gpt2_fast.train", "train or fine-tune GPT-2 (single process, or DDP / FSDP2 under torchrun)"),
    "eval": ("gpt2_fast.eval", "perplexity, LAMBADA accuracy and zero-shot tasks of a model"),
    "demo": ("gpt2_fast.demo", "prepare the bundled corpus, train a small GPT-2, evaluate, sample"),
    "export": ("gpt2_fast.export", "convert a checkpoint (.pt or training folder) into an HF folder with tokenizer files"),
}
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def add_arguments(parser: argparse.ArgumentParser) -> None:  # `info` takes no arguments
    pass


def run(args) -> int:
    from .info import info_lines
    print("\n".join(info_lines()))
    return 0


def _version_line() -> str:
    import platform

    import torch

    from . import __version__
    return f"gpt2-fast {__version__} (python {platform.python_version()}, torch {torch.__version__})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`gpt2-fast <cmd>: error: ...`, exit 2); subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2-fast", description="GPT-2 with fused Triton/CUDA kernels.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except KeyboardInterrupt:
        print(f"gpt2-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("GPT2_FAST_DEBUG") == "1":
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1


def error_line(command: str, e: BaseException) -> str:
    """The one-line message of exception e for `gpt2-fast <command>`."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, USER_ERRORS):
        msg = f"{type(e).__name__}: {msg} (an internal error; GPT2_FAST_DEBUG=1 shows the traceback)"
    elif isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return f"gpt2-fast {command}: error: {msg}"


if __name__ == "__main__":
    raise SystemExit(main())

"""`gpt2-fast bench kernels|decode|train`: the three benchmarks (see bench/README.md).

Every command prints a table, writes JSON (+ CSV and a PNG for kernels) stamped with the device,
versions, git sha and date to --out (default: $OUT when set, else bench/results/), and measures
its peers and ceilings in the same run. --quick (the default on CPU) uses tiny shapes and few
iterations there, and the output says plainly that the figures are CPU figures; on CUDA it keeps
the real shapes and shortens the timing.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import common

COMMANDS = {
    "kernels": ("gpt2_fast.benchmarks.kernels", "per-op microbenchmarks vs torch, torch.compile, SDPA, Liger"),
    "decode": ("gpt2_fast.benchmarks.decode", "batch-1 generation latency vs HF generate and torch.compile"),
    "train": ("gpt2_fast.benchmarks.train", "training tokens/s and MFU vs torch eager/compile and HF"),
}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--quick", action="store_true", default=None,
                   help="quick mode, the default on CPU: tiny shapes and few iterations there; "
                        "on CUDA the real shapes with shorter timing and fewer steps")
    p.add_argument("--full", dest="quick", action="store_false",
                   help="the real shapes even on CPU (slow there)")
    p.add_argument("--out", default=None,
                   help="folder for JSON/CSV/PNG (default: $OUT when set, else bench/results)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import importlib
    sub = parser.add_subparsers(dest="bench_command", metavar="{kernels,decode,train}")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common_arguments(p)
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    import importlib
    device = common.parse_device(args.device)
    if args.quick is None:
        args.quick = device.type == "cpu"
    out_dir = None if args.no_write else (args.out or common.default_out_dir())
    if out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a folder; expected a folder for the results")
    module = importlib.import_module(COMMANDS[args.bench_command][0])
    module.run(args, device, out_dir)
    return 0


def main(argv=None) -> int:
    """Same as `gpt2-fast bench ...` (argv without the leading 'bench')."""
    from ..cli import main as gpt2_fast_main
    return gpt2_fast_main(["bench"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())

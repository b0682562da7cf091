"""`gpt2-fast prepare`: text files -> a folder of token shards, replacing its previous shards only
after success.

`prepare` streams its inputs (gpt2_fast/data_text.py) into new shards (gpt2_fast/data_tokenize.py)
written into a temporary folder inside the output folder; only when everything succeeded are they
renamed into place, meta.json replaced, and the previous shards of that corpus removed. A failure
or Ctrl-C before then leaves the previous shards and meta.json as they were. A run killed outright
(SIGKILL) leaves its temporary folder behind: the next `prepare` into that folder removes it once
the folder's owner file proves it a dead prepare's own (gpt2_fast/owned_tmpdir.py), and says so.
One folder holds one corpus: preparing a second corpus into it is refused (prepare(...,
replace=True) / --replace swaps it in).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from typing import Optional, Sequence

from .atomic import atomic_write
from .data_shards import SHARD_NAME_RE, read_meta
from .data_text import list_inputs
from .data_tokenize import tokenize_files
from .owned_tmpdir import make_owned_tmpdir, reclaim_abandoned

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "data", "kjv.txt.gz")
TMP_PREFIX = ".tmp-prepare-"  # the new shards' folder inside out_dir until they are swapped in
TOOL = "gpt2-fast prepare"


def prepare(inputs: Sequence[str], out_dir: str, name: Optional[str] = None, val_fraction: float = 0.05,
            shard_tokens: int = 100_000_000, text_field: str = "text", num_threads: Optional[int] = None,
            progress: bool = True, replace: bool = False) -> dict:
    """Tokenize text files / folders into train and val shards in out_dir; returns meta.json's dict.

    Each document is preceded by <|endoftext|>. val_fraction (0 <= f < 0.5) of the token stream
    goes to val, in blocks spread over the whole stream. The shards of an earlier preparation of
    the same corpus (name) are replaced, after success only; a different corpus already in out_dir
    is refused unless replace=True (then the files its meta.json lists are replaced).
    """
    if not 0.0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    files = list_inputs(inputs)
    name = name or _default_name(files)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-]*(?:_[A-Za-z0-9.\-]+)*", name) or \
            SHARD_NAME_RE.match(name + "_train.bin").group("corpus") != name:
        raise ValueError(f"the corpus name must be letters, digits, '.', '-' and single '_' "
                         f"(not ending in _train / _val), got {name!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    reclaim_abandoned(out_dir, TMP_PREFIX, TOOL)  # the temp folders of killed runs (pid gone), only
    old_files = _previous_corpus(out_dir, name, replace)
    tmp = make_owned_tmpdir(out_dir, TMP_PREFIX, TOOL)
    try:
        meta = tokenize_files(files, tmp, name, val_fraction, shard_tokens, text_field, num_threads, progress)
        _swap_in(tmp, out_dir, meta, old_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # made in this run; after a swap only its owner file is left
    return meta


def _previous_corpus(out_dir: str, name: str, replace: bool) -> list[str]:
    """Files of an earlier preparation in out_dir that the new one replaces; refuses to mix."""
    try:
        meta = read_meta(out_dir)
    except ValueError as e:
        raise FileExistsError(f"{e}; prepare cannot tell which corpus {out_dir} holds: move that meta.json "
                              f"away or prepare into another --out folder") from None
    ours = re.compile(rf"^{re.escape(name)}_(train|val)_\d{{6}}\.bin$")
    if meta is None:
        foreign = sorted(f for f in os.listdir(out_dir) if SHARD_NAME_RE.match(f) and not ours.match(f))
        if foreign:
            raise FileExistsError(f"{out_dir} holds token shards that no meta.json describes ({', '.join(foreign[:3])}"
                                  f"{'...' if len(foreign) > 3 else ''}); prepare into another --out folder")
        return [f for f in os.listdir(out_dir) if ours.match(f)]
    old = meta.get("name")
    if old != name and not replace:
        raise FileExistsError(f"{out_dir} already holds the prepared corpus {old!r} (meta.json); preparing "
                              f"{name!r} there would mix two corpora: use another --out folder, or --replace "
                              f"to replace {old!r}")
    listed = [n for split in ("train", "val") for n in meta["shards"].get(split, [])]
    return sorted(set(listed + [f"{old}_unigram.npy"] + [f for f in os.listdir(out_dir) if ours.match(f)]))


@contextlib.contextmanager
def _no_interrupt():
    """Ctrl-C is held back until the block ends (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _swap_in(tmp: str, out_dir: str, meta: dict, old_files: Sequence[str]) -> None:
    """Move the new shards and counts from tmp into out_dir, write meta.json, then remove the
    previous corpus's files; Ctrl-C waits for the end of these renames."""
    new = [n for split in ("train", "val") for n in meta["shards"][split]] + [f"{meta['name']}_unigram.npy"]

    def write_meta(path: str) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
    with _no_interrupt():
        for n in new:
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
        atomic_write(os.path.join(out_dir, "meta.json"), write_meta)
        for n in sorted(set(old_files) - set(new)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out_dir, n))


def _default_name(files: Sequence[str]) -> str:
    base = os.path.basename(files[0])
    for suffix in (".gz", ".jsonl", ".txt", ".text", ".md"):
        base = base[:-len(suffix)] if base.endswith(suffix) else base
    return base or "data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="text files (.txt, .gz, .jsonl with a text field) or "
                                              "folders; default: the bundled King James Bible")
    p.add_argument("--out", default="out/data", help="output folder (default: out/data)")
    p.add_argument("--name", default=None, help="shard name prefix (default: the first file's name)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens for val, in [0, 0.5)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replace", action="store_true",
                   help="replace a different corpus already prepared in --out (the files its meta.json lists)")


def run(args) -> int:
    meta = prepare(args.inputs or [DEFAULT_CORPUS], args.out, name=args.name, val_fraction=args.val_fraction,
                   shard_tokens=args.shard_tokens, text_field=args.text_field, num_threads=args.threads,
                   progress=not args.no_progress, replace=args.replace)
    t = meta["tokens"]
    print(f"{meta['documents']} documents, {meta['text_bytes']:,} bytes -> {t['train']:,} train + "
          f"{t['val']:,} val tokens in {args.out} ({meta['seconds']} s)", file=sys.stderr)
    return 0

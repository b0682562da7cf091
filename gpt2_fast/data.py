"""Token shards: `gpt2-fast prepare` writes them, `TokenLoader` streams (x, y) batches from them.

Shard format (the llm.c layout, so llm.c reads our shards and we read its):
    header  256 x int32 little-endian: [MAGIC=20240520, VERSION=1, n_tokens, 0, ...]
    body    n_tokens x uint16 GPT-2 token ids
Documents are separated by <|endoftext|> (50256), which also starts the stream. A prepared
folder holds {name}_{split}_{index:06d}.bin shards plus meta.json (token counts, sources).

The train/val split is made on the token stream: of every `split_every` consecutive blocks of
SPLIT_BLOCK tokens, the last goes to val. A single long text (the bundled Bible) thus gets a val
set spread over the whole book instead of its last chapters.

TokenLoader treats the shards of a split as one stream and cuts it into windows of T+1 tokens
(x = window[:-1], y = window[1:]) that start every T tokens. Each call to next_batch() consumes
one global micro-batch of world_size * B windows, of which rank r takes the r-th B. "sequential"
walks the windows in order (every token once per epoch); "random" walks a permutation drawn
from (seed, epoch) with a per-epoch random offset. Its position (epoch, windows consumed) is
state_dict() / load_state_dict(), independent of B and of the number of ranks.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .atomic import atomic_write
from .tokenizer import EOT_TOKEN, N_VOCAB, get_tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLIT_BLOCK = 4096
DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "data", "kjv.txt.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".text", ".md", ".jsonl", ".jsonl.gz", ".gz")


# ---------------------------------------------------------------------------------------------
# shard files
# ---------------------------------------------------------------------------------------------

def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write uint16 `tokens` as one shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids must fit uint16 [0, 65536); got min {tokens.min()}, max {tokens.max()}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        _make_readable(tmp)

    atomic_write(path, write)


def _make_readable(path: str) -> None:
    """mkstemp files are 0600; give shards the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_header(path: str) -> int:
    """Check a shard's header and size; return its token count."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: not a token shard ({size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]} is not supported (expected {VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: truncated or corrupt shard: header says {n} tokens "
                         f"({HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes")
    return n


def read_shard(path: str) -> np.ndarray:
    """A read-only uint16 memory map of a shard's tokens."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_paths(data: str, split: str) -> list[str]:
    """The shards of `split` in folder `data` (or matching the glob `data`), sorted."""
    if os.path.isdir(data):
        paths = sorted(glob.glob(os.path.join(data, f"*_{split}_*.bin")))
        where = f"folder {data}"
    else:
        paths = sorted(p for p in glob.glob(data) if f"_{split}_" in os.path.basename(p))
        where = f"pattern {data!r}"
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin) in {where}; "
                                f"run `gpt2-fast prepare` first")
    return paths


# ---------------------------------------------------------------------------------------------
# prepare: text -> shards
# ---------------------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); convert it to UTF-8 first") from None


def parse_jsonl(lines: Iterable[str], path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line; bad JSON names the file and line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: a .jsonl(.gz) gives one per line ({text_field: ...}),
    any other file is one document."""
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (no text to tokenize)")
    base = path[:-3] if path.endswith(".gz") else path
    if not base.endswith(".jsonl"):
        yield text
        return
    n = 0
    for lineno, obj in parse_jsonl(text.splitlines(), path):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                             f"{text_field!r}, got {str(obj)[:80]!r}")
        if obj[text_field]:
            n += 1
            yield obj[text_field]
    if n == 0:
        raise ValueError(f"{path}: no non-empty {text_field!r} field in any line")


def list_inputs(inputs: Sequence[str]) -> list[str]:
    """Files given directly, and the text files found (recursively, sorted) in folders given."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names
                           if f.endswith(TEXT_SUFFIXES) and not f.startswith("."))
            if not found:
                raise ValueError(f"folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p!r} does not exist")
    if not files:
        raise ValueError("no input files given")
    return files


PARALLEL_MIN_CHARS = 1 << 20  # documents longer than this are cut into pieces for the threads


def _split_points(text: str, pieces: int, min_piece: int = 65536) -> list[str]:
    """Cut text into about `pieces` parts at a newline followed by a non-space character: GPT-2's
    pre-tokenizer never joins across such a point, so encoding the parts gives the same ids as
    encoding the whole."""
    if pieces <= 1 or len(text) < 2 * min_piece:
        return [text]
    step = max(len(text) // pieces, min_piece)
    parts, start = [], 0
    while start < len(text):
        cut = start + step
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        parts.append(text[start:cut])
        start = cut
    return parts


def encode_documents(docs: Sequence[str], num_threads: Optional[int] = None) -> list[np.ndarray]:
    """Each document's ids (ordinary text: a literal '<|endoftext|>' in the text is not special),
    tokenized on all cores with tiktoken's threads; long documents are cut at safe points."""
    tok = get_tokenizer()
    num_threads = num_threads or os.cpu_count() or 1
    pieces, owner = [], []
    for i, d in enumerate(docs):
        parts = _split_points(d, 4 * num_threads) if len(d) > PARALLEL_MIN_CHARS else [d]
        pieces += parts
        owner += [i] * len(parts)
    ids = tok.encode_batch(pieces, allow_special=False, num_threads=num_threads)
    out: list[list[int]] = [[] for _ in docs]
    for i, piece_ids in zip(owner, ids):
        out[i] += piece_ids
    return [np.asarray(o, dtype=np.uint16) for o in out]


class _ShardWriter:
    """Buffers tokens of one split and writes a shard whenever `shard_tokens` are there."""

    def __init__(self, out_dir: str, name: str, split: str, shard_tokens: int):
        self.out_dir, self.name, self.split, self.shard_tokens = out_dir, name, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.paths: list[str] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.n_buf += tokens.size
        self.total += tokens.size
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        path = os.path.join(self.out_dir, f"{self.name}_{self.split}_{len(self.paths):06d}.bin")
        write_shard(path, data[:n])
        self.paths.append(path)
        rest = data[n:]
        self.buf, self.n_buf = ([rest] if rest.size else []), rest.size

    def close(self) -> None:
        if self.n_buf:
            self._flush(self.n_buf)


def prepare(inputs: Sequence[str], out_dir: str, name: Optional[str] = None, val_fraction: float = 0.05,
            shard_tokens: int = 100_000_000, text_field: str = "text", num_threads: Optional[int] = None,
            progress: bool = True) -> dict:
    """Tokenize text files / folders into train and val shards in out_dir; returns meta.json's dict.

    Each document is preceded by <|endoftext|>. val_fraction (0 <= f < 0.5) of the token stream
    goes to val, in blocks spread over the whole stream. Existing shards of the same name are
    replaced.
    """
    if not 0.0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    files = list_inputs(inputs)
    name = name or _default_name(files)
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, f"{name}_*_*.bin")):
        os.unlink(old)
    split_every = round(1 / val_fraction) if val_fraction > 0 else 0
    writers = {s: _ShardWriter(out_dir, name, s, shard_tokens) for s in ("train", "val")}
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    stream_pos, n_docs, n_bytes = 0, 0, 0
    t0 = time.time()
    bar = _tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
                desc=f"tokenizing {len(files)} file(s)", disable=not progress)

    def route(tokens: np.ndarray) -> None:  # the block split: every split_every-th block is val
        nonlocal stream_pos
        i = 0
        while i < tokens.size:
            block, off = divmod(stream_pos, SPLIT_BLOCK)
            take = min(SPLIT_BLOCK - off, tokens.size - i)
            is_val = split_every and block % split_every == split_every - 1
            writers["val" if is_val else "train"].add(tokens[i:i + take])
            if not is_val:
                counts[:] += np.bincount(tokens[i:i + take], minlength=N_VOCAB)
            i += take
            stream_pos += take

    eot = np.array([EOT_TOKEN], dtype=np.uint16)
    for path in files:
        batch, batch_chars = [], 0
        for doc in iter_documents(path, text_field):
            batch.append(doc)
            batch_chars += len(doc)
            n_bytes += len(doc.encode("utf-8"))
            if batch_chars >= 8 << 20:
                for ids in encode_documents(batch, num_threads):
                    route(eot), route(ids)
                n_docs += len(batch)
                batch, batch_chars = [], 0
        if batch:
            for ids in encode_documents(batch, num_threads):
                route(eot), route(ids)
            n_docs += len(batch)
        bar.update(os.path.getsize(path))
    bar.close()
    for w in writers.values():
        w.close()
    if writers["train"].total == 0:
        raise ValueError("no training tokens were produced")
    meta = {
        "name": name, "format": {"magic": MAGIC, "version": VERSION, "dtype": "uint16"},
        "sources": [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
        "documents": n_docs, "text_bytes": n_bytes, "val_fraction": val_fraction,
        "split_block": SPLIT_BLOCK, "tokens": {s: w.total for s, w in writers.items()},
        "shards": {s: [os.path.basename(p) for p in w.paths] for s, w in writers.items()},
        "seconds": round(time.time() - t0, 2),
    }
    np.save(os.path.join(out_dir, f"{name}_unigram.npy"), counts)

    def write_meta(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        _make_readable(tmp)

    atomic_write(os.path.join(out_dir, "meta.json"), write_meta)
    return meta


def _default_name(files: Sequence[str]) -> str:
    base = os.path.basename(files[0])
    for suffix in (".gz", ".jsonl", ".txt", ".text", ".md"):
        base = base[:-len(suffix)] if base.endswith(suffix) else base
    return base or "data"


def _tqdm(**kw):
    try:
        from tqdm.auto import tqdm
        return tqdm(**kw)
    except ImportError:  # tqdm is a dependency, but keep prepare usable without it
        class _Null:
            def update(self, *a): pass
            def close(self): pass
        return _Null()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unigram_baseline(data: str, alpha: float = 1.0) -> dict:
    """Val cross-entropy (nats/token) of the add-alpha unigram model of the train tokens: the
    loss a model that ignores context would get. Returns {'loss', 'ppl'}."""
    counts_path = glob.glob(os.path.join(data, "*_unigram.npy"))
    if counts_path:
        counts = np.load(counts_path[0]).astype(np.float64)
    else:
        counts = np.zeros(N_VOCAB, dtype=np.float64)
        for p in shard_paths(data, "train"):
            counts += np.bincount(read_shard(p), minlength=N_VOCAB)[:N_VOCAB]
    logp = np.log(counts + alpha) - np.log(counts.sum() + alpha * N_VOCAB)
    val = np.zeros(N_VOCAB, dtype=np.float64)
    for p in shard_paths(data, "val"):
        val += np.bincount(read_shard(p), minlength=N_VOCAB)[:N_VOCAB]
    loss = float(-(val * logp).sum() / val.sum())
    return {"loss": loss, "ppl": float(np.exp(loss))}


# ---------------------------------------------------------------------------------------------
# loading: shards -> (x, y) batches
# ---------------------------------------------------------------------------------------------

@dataclass
class LoaderState:
    epoch: int = 0
    pos: int = 0  # windows of this epoch already consumed (by all ranks together)


class TokenLoader:
    """Memory-mapped (x, y) batches of shape (B, T) from the shards of one split.

    data: a prepared folder or a glob of shards. order: "sequential" or "random".
    rank / world_size: this process's slice of each global micro-batch (DDP).
    """

    def __init__(self, data: str, split: str, batch_size: int, seq_len: int, order: str = "sequential",
                 seed: int = 1337, rank: int = 0, world_size: int = 1, device="cpu"):
        if order not in ("sequential", "random"):
            raise ValueError(f"order must be 'sequential' or 'random', got {order!r}")
        for key, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.paths = shard_paths(data, split)
        self.shards = [read_shard(p) for p in self.paths]
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.starts[-1])
        self.split, self.B, self.T, self.order, self.seed = split, batch_size, seq_len, order, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        need = world_size * batch_size * seq_len + 1
        if self.n_tokens < need:
            raise ValueError(
                f"the {split} split has {self.n_tokens} tokens, fewer than one batch needs: "
                f"world_size {world_size} x batch_size {batch_size} x seq_len {seq_len} + 1 = {need}; "
                f"use a smaller batch_size / seq_len or more data")
        self.state = LoaderState()
        self._epoch_cache: tuple[int, int, Optional[np.ndarray]] = (-1, 0, None)

    # -- the epoch's windows ----------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[int, Optional[np.ndarray]]:
        """(offset of window 0, permutation of the windows or None) for `epoch`."""
        if self._epoch_cache[0] != epoch:
            if self.order == "sequential":
                self._epoch_cache = (epoch, 0, None)
            else:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                offset = int(rng.integers(0, self.T)) if self.n_tokens - 1 >= 2 * self.T else 0
                n = (self.n_tokens - 1 - offset) // self.T
                self._epoch_cache = (epoch, offset, rng.permutation(n))
        return self._epoch_cache[1], self._epoch_cache[2]

    def windows_per_epoch(self, epoch: Optional[int] = None) -> int:
        offset, _ = self._epoch_plan(self.state.epoch if epoch is None else epoch)
        return (self.n_tokens - 1 - offset) // self.T

    def batches_per_epoch(self) -> int:
        """Global micro-batches (world_size * B windows) per epoch."""
        return self.windows_per_epoch() // (self.world_size * self.B)

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream (may span shards)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, need = [], length
        while need:
            local = start - int(self.starts[i])
            chunk = self.shards[i][local:local + need]
            out.append(chunk)
            need -= chunk.size
            start += chunk.size
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    # -- iteration --------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank, int64 (B, T) on the loader's device."""
        G = self.world_size * self.B
        if self.state.pos + G > self.windows_per_epoch():
            self.state = LoaderState(self.state.epoch + 1, 0)
        offset, perm = self._epoch_plan(self.state.epoch)
        first = self.state.pos + self.rank * self.B
        idx = np.arange(first, first + self.B)
        if perm is not None:
            idx = perm[idx]
        rows = np.stack([self._read(offset + int(w) * self.T, self.T + 1) for w in idx])
        self.state.pos += G
        buf = torch.from_numpy(rows.astype(np.int64))                    # (B, T+1)
        x, y = buf[:, :-1], buf[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        self.state = LoaderState()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "pos": self.state.pos, "order": self.order,
                "seed": self.seed, "seq_len": self.T, "n_tokens": self.n_tokens}

    def load_state_dict(self, d: dict) -> None:
        for key, mine in (("order", self.order), ("seed", self.seed), ("seq_len", self.T),
                          ("n_tokens", self.n_tokens)):
            if key in d and d[key] != mine:
                raise ValueError(f"cannot resume the data position: it was saved with {key}={d[key]!r}, "
                                 f"this loader has {key}={mine!r}")
        self.state = LoaderState(int(d["epoch"]), int(d["pos"]))


# ---------------------------------------------------------------------------------------------
# `gpt2-fast prepare`
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="text files (.txt, .gz, .jsonl with a text field) or "
                                              "folders; default: the bundled King James Bible")
    p.add_argument("--out", default="out/data", help="output folder (default: out/data)")
    p.add_argument("--name", default=None, help="shard name prefix (default: the first file's name)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    meta = prepare(args.inputs or [DEFAULT_CORPUS], args.out, name=args.name, val_fraction=args.val_fraction,
                   shard_tokens=args.shard_tokens, text_field=args.text_field, num_threads=args.threads,
                   progress=not args.no_progress)
    t = meta["tokens"]
    print(f"{meta['documents']} documents, {meta['text_bytes']:,} bytes -> {t['train']:,} train + "
          f"{t['val']:,} val tokens in {args.out} ({meta['seconds']} s)", file=sys.stderr)
    return 0

"""Token shards: `gpt2-fast prepare` writes them, `TokenLoader` streams (x, y) batches from them.

Shard format (the llm.c layout, so llm.c reads our shards and we read its):
    header  256 x int32 little-endian: [MAGIC=20240520, VERSION=1, n_tokens, 0, ...]
    body    n_tokens x uint16 GPT-2 token ids
Documents are separated by <|endoftext|> (50256), which also starts the stream. A prepared
folder holds {name}_{split}_{index:06d}.bin shards plus meta.json (token counts, sources, and
the list of shards: the loader reads exactly those). One folder holds one corpus: preparing a
second corpus into it is refused (prepare(..., replace=True) / --replace swaps it in).

`prepare` streams its inputs (READ_CHUNK_BYTES at a time, cut where GPT-2's pre-tokenizer never
joins, so the ids equal those of the whole text) and writes the new shards into a temporary
folder inside the output folder; only when everything succeeded are they renamed into place,
meta.json replaced, and the previous shards of that corpus removed. A failure or Ctrl-C before
then leaves the previous shards and meta.json as they were.

Shards are found (shard_paths) from a prepared folder (meta.json), a folder without meta.json
holding one corpus's shards (llm.c's layout: x_train_000000.bin or tiny_shakespeare_train.bin),
one shard file (its split sibling: tiny_shakespeare_train.bin -> tiny_shakespeare_val.bin), or
a glob.

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
import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
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


_SHARD_RE = re.compile(r"^(?P<corpus>.+)_(?P<split>train|val)(?:_\d+)?\.bin$")


def _split_of(path: str, split: str) -> bool:
    m = _SHARD_RE.match(os.path.basename(path))
    return bool(m) and m.group("split") == split


def read_meta(folder: str) -> Optional[dict]:
    """meta.json of a prepared folder, or None when there is none."""
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), dict):
        raise ValueError(f"{path}: expected gpt2-fast prepare's meta.json with a 'shards' entry")
    return meta


def shard_paths(data: str, split: str) -> list[str]:
    """The shards of `split` (train / val) named by `data`: a prepared folder (exactly the shards
    its meta.json lists), a folder of one corpus's shards, one shard file, or a glob; sorted."""
    if os.path.isdir(data):
        meta = read_meta(data)
        if meta is not None:
            paths = [os.path.join(data, n) for n in meta["shards"].get(split, [])]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{os.path.join(data, 'meta.json')} lists {missing[0]}, which is missing "
                                        f"({len(missing)} of {len(paths)} {split} shards); re-run `gpt2-fast prepare`")
            where = f"folder {data} (its meta.json lists none)"
        else:
            paths = sorted(p for p in glob.glob(os.path.join(data, "*.bin")) if _split_of(p, split))
            corpora = sorted({_SHARD_RE.match(os.path.basename(p)).group("corpus") for p in paths})
            if len(corpora) > 1:
                raise ValueError(f"folder {data} holds the {split} shards of {len(corpora)} corpora "
                                 f"({', '.join(corpora[:4])}) and no meta.json; pass one of them as a glob, "
                                 f"e.g. '{os.path.join(data, corpora[0])}_*.bin'")
            where = f"folder {data}"
    elif os.path.isfile(data):
        paths, where = _sibling_shard(data, split)
    else:
        paths = sorted(p for p in glob.glob(data) if _split_of(p, split))
        where = f"pattern {data!r}"
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin or *_{split}.bin) in {where}; "
                                f"run `gpt2-fast prepare` first")
    return paths


def _sibling_shard(path: str, split: str) -> tuple[list[str], str]:
    """One shard file given for data: itself for its own split, its sibling for the other
    (tiny_shakespeare_train.bin <-> tiny_shakespeare_val.bin)."""
    m = _SHARD_RE.match(os.path.basename(path))
    if not m:
        raise ValueError(f"{path}: expected a token shard named like NAME_train.bin, NAME_val.bin or "
                         f"NAME_train_000000.bin (llm.c's layout), or a prepared folder")
    if m.group("split") == split:
        return [path], f"file {path}"
    name = os.path.basename(path)
    i = name.rfind("_" + m.group("split"))
    sibling = os.path.join(os.path.dirname(path), name[:i] + "_" + split + name[i + 1 + len(m.group("split")):])
    return ([sibling] if os.path.isfile(sibling) else []), f"{sibling} (the {split} sibling of {path})"


# ---------------------------------------------------------------------------------------------
# prepare: text -> shards
# ---------------------------------------------------------------------------------------------

READ_CHUNK_BYTES = 4 << 20  # prepare reads its inputs this much at a time
MAX_PIECE_CHARS = 64 << 20  # a text with no safe cut point is cut here anyway


def _iter_text(path: str, chunk_bytes: Optional[int] = None) -> Iterator[str]:
    """The UTF-8 text of a file (.gz decompressed), decoded chunk_bytes at a time; errors name
    the file (and the byte offset of invalid UTF-8)."""
    chunk_bytes = chunk_bytes or READ_CHUNK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            while True:
                raw = f.read(chunk_bytes)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    at = offset - (len(e.object) - len(raw)) + e.start
                    raise ValueError(f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at "
                                     f"offset {at}); convert it to UTF-8 first") from None
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def _read_text(path: str) -> str:
    return "".join(_iter_text(path))


def safe_cut(text: str, lo: int = 0) -> int:
    """The last i > lo where text[i-1] is not whitespace and text[i] is, else 0. Encoding text[:i]
    and text[i:] apart gives the ids of encoding the whole: no alternative of GPT-2's
    pre-tokenizer pattern matches a non-space character followed by whitespace, and it has no
    look-behind, so a match boundary always falls there."""
    for i in range(len(text) - 1, max(lo, 0), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return 0


def _text_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """Re-cut a stream of text chunks at safe points (safe_cut)."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        cut = safe_cut(buf, len(buf) - len(chunk) - 1)  # the carried part has no cut point: skip it
        if cut == 0 and len(buf) > MAX_PIECE_CHARS:
            cut = len(buf)  # no whitespace at all for 64M characters: cut anyway
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    buf = ""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split("\n")
        yield from lines
    if buf:
        yield buf


def parse_jsonl(lines: Iterable[str], path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line; bad JSON names the file and line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def iter_pieces(path: str, text_field: str = "text") -> Iterator[tuple[bool, str]]:
    """(starts a document, text) pieces of one file, streamed: a .jsonl(.gz) gives one document
    per line ({text_field: ...}); any other file is one document, in pieces cut at safe points."""
    base = path[:-3] if path.endswith(".gz") else path
    n = 0
    if base.endswith(".jsonl"):
        for lineno, obj in parse_jsonl(_lines(_iter_text(path)), path):
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                                 f"{text_field!r}, got {str(obj)[:80]!r}")
            if obj[text_field]:
                n += 1
                yield True, obj[text_field]
        if n == 0:
            raise ValueError(f"{path}: no non-empty {text_field!r} field in any line")
        return
    started = has_text = False
    for piece in _text_pieces(_iter_text(path)):
        yield not started, piece
        started, has_text = True, has_text or bool(piece.strip())
    if not has_text:
        raise ValueError(f"{path}: the file is empty (no text to tokenize)")


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, each whole (iter_pieces joined)."""
    doc: list[str] = []
    for new, piece in iter_pieces(path, text_field):
        if new and doc:
            yield "".join(doc)
            doc = []
        doc.append(piece)
    if doc:
        yield "".join(doc)


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
BATCH_CHARS = 8 << 20  # characters tokenized together (on all threads) while streaming


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
            _SHARD_RE.match(name + "_train.bin").group("corpus") != name:
        raise ValueError(f"the corpus name must be letters, digits, '.', '-' and single '_' "
                         f"(not ending in _train / _val), got {name!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    old_files = _previous_corpus(out_dir, name, replace)
    tmp = tempfile.mkdtemp(prefix=".tmp-prepare-", dir=out_dir)
    try:
        meta = _tokenize(files, tmp, name, val_fraction, shard_tokens, text_field, num_threads, progress)
        _swap_in(tmp, out_dir, meta, old_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # made in this run; empty after a successful swap
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
        foreign = sorted(f for f in os.listdir(out_dir) if _SHARD_RE.match(f) and not ours.match(f))
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


def _tokenize(files: Sequence[str], out_dir: str, name: str, val_fraction: float, shard_tokens: int,
              text_field: str, num_threads: Optional[int], progress: bool) -> dict:
    """Stream `files` into shards in out_dir (and the train unigram counts); meta.json's dict."""
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

    def flush(batch: list[tuple[bool, str]]) -> None:
        for (new_doc, _), ids in zip(batch, encode_documents([t for _, t in batch], num_threads)):
            if new_doc:
                route(eot)
            route(ids)

    for path in files:
        batch, batch_chars = [], 0
        for new_doc, piece in iter_pieces(path, text_field):
            batch.append((new_doc, piece))
            batch_chars += len(piece)
            n_docs += new_doc
            n_bytes += len(piece.encode("utf-8"))
            if batch_chars >= BATCH_CHARS:
                flush(batch)
                batch, batch_chars = [], 0
        flush(batch)
        bar.update(os.path.getsize(path))
    bar.close()
    for w in writers.values():
        w.close()
    if writers["train"].total == 0:
        raise ValueError("no training tokens were produced")
    np.save(os.path.join(out_dir, f"{name}_unigram.npy"), counts)
    return {
        "name": name, "format": {"magic": MAGIC, "version": VERSION, "dtype": "uint16"},
        "sources": [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
        "documents": n_docs, "text_bytes": n_bytes, "val_fraction": val_fraction,
        "split_block": SPLIT_BLOCK, "tokens": {s: w.total for s, w in writers.items()},
        "shards": {s: [os.path.basename(p) for p in w.paths] for s, w in writers.items()},
        "seconds": round(time.time() - t0, 2),
    }


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
    meta = read_meta(data) if os.path.isdir(data) else None
    counts_path = [os.path.join(data, f"{meta['name']}_unigram.npy")] if meta else \
        glob.glob(os.path.join(data, "*_unigram.npy")) if os.path.isdir(data) else []
    counts_path = [p for p in counts_path if os.path.isfile(p)]
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

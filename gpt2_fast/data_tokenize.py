"""Text -> token shards: documents tokenized on all cores, the stream split into train and val,
written as shards (gpt2_fast/data_shards.py) with the train split's unigram counts.

Each document is preceded by <|endoftext|> (50256), which thus also starts the stream. The
train/val split is made on the token stream: of every `split_every` consecutive blocks of
SPLIT_BLOCK tokens, the last goes to val. A single long text (the bundled Bible) thus gets a val
set spread over the whole book instead of its last chapters.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from .data_shards import MAGIC, VERSION, write_shard
from .data_text import iter_pieces
from .tokenizer import EOT_TOKEN, N_VOCAB, get_tokenizer

SPLIT_BLOCK = 4096
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


def tokenize_files(files: Sequence[str], out_dir: str, name: str, val_fraction: float, shard_tokens: int,
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


def _tqdm(**kw):
    try:
        from tqdm.auto import tqdm
        return tqdm(**kw)
    except ImportError:  # tqdm is a dependency, but keep prepare usable without it
        class _Null:
            def update(self, *a): pass
            def close(self): pass
        return _Null()

"""Token shard files: the format, writing and reading one, finding a corpus's shards, and the
unigram baseline of a prepared folder.

Shard format (the llm.c layout, so llm.c reads our shards and we read its):
    header  256 x int32 little-endian: [MAGIC=20240520, VERSION=1, n_tokens, 0, ...]
    body    n_tokens x uint16 GPT-2 token ids
A prepared folder holds {name}_{split}_{index:06d}.bin shards plus meta.json (token counts,
sources, and the list of shards: readers use exactly those).

Shards are found (shard_paths) from a prepared folder (meta.json), a folder without meta.json
holding one corpus's shards (llm.c's layout: x_train_000000.bin or tiny_shakespeare_train.bin),
one shard file (its split sibling: tiny_shakespeare_train.bin -> tiny_shakespeare_val.bin), or
a glob.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

import numpy as np

from .atomic import atomic_write
from .tokenizer import N_VOCAB

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


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


SHARD_NAME_RE = re.compile(r"^(?P<corpus>.+)_(?P<split>train|val)(?:_\d+)?\.bin$")


def _split_of(path: str, split: str) -> bool:
    m = SHARD_NAME_RE.match(os.path.basename(path))
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
            corpora = sorted({SHARD_NAME_RE.match(os.path.basename(p)).group("corpus") for p in paths})
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
    m = SHARD_NAME_RE.match(os.path.basename(path))
    if not m:
        raise ValueError(f"{path}: expected a token shard named like NAME_train.bin, NAME_val.bin or "
                         f"NAME_train_000000.bin (llm.c's layout), or a prepared folder")
    if m.group("split") == split:
        return [path], f"file {path}"
    name = os.path.basename(path)
    i = name.rfind("_" + m.group("split"))
    sibling = os.path.join(os.path.dirname(path), name[:i] + "_" + split + name[i + 1 + len(m.group("split")):])
    return ([sibling] if os.path.isfile(sibling) else []), f"{sibling} (the {split} sibling of {path})"


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

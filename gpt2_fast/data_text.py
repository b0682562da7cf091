"""Input text for `gpt2-fast prepare`, streamed: files (.gz decompressed) decoded as UTF-8 a
chunk at a time, re-cut where GPT-2's pre-tokenizer never joins (safe_cut), so tokenizing the
pieces gives the ids of the whole text; .jsonl(.gz) files as one document per line.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import zlib
from typing import Iterable, Iterator, Optional, Sequence

TEXT_SUFFIXES = (".txt", ".txt.gz", ".text", ".md", ".jsonl", ".jsonl.gz", ".gz")
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


def read_text(path: str) -> str:
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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

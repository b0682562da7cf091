"""GPT-2's byte-level BPE: tiktoken over the ranks file vendored in gpt2_fast/data/.

The ranks file (gpt2.tiktoken, MIT, from openai-whisper; see data/LICENSE-gpt2.tiktoken.txt)
is checked by sha256 at load and never downloaded. Ids are exactly GPT-2's.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
from typing import Iterable, Optional, Sequence

RANKS_PATH = os.path.join(os.path.dirname(__file__), "data", "gpt2.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = 50256
N_VOCAB = 50257
# GPT-2's pre-tokenizer split (the r50k_base pattern).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path: str = RANKS_PATH, sha256: Optional[str] = RANKS_SHA256) -> dict:
    """The mergeable ranks {token bytes: id}; raises ValueError if the file is not the expected one."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"BPE ranks file {path} is corrupt or not GPT-2's: sha256 {digest}, "
                         f"expected {sha256}. Reinstall gpt2_fast to restore it.")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """encode / decode / encode_batch with GPT-2 ids; `<|endoftext|>` is `eot_token` (50256)."""

    def __init__(self, path: str = RANKS_PATH, sha256: Optional[str] = RANKS_SHA256):
        import tiktoken
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=load_ranks(path, sha256),
                                      special_tokens={"<|endoftext|>": EOT_TOKEN})
        self.eot_token = EOT_TOKEN
        self.n_vocab = self._enc.n_vocab

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. '<|endoftext|>' in the text becomes 50256 (as HF's GPT-2 tokenizer) unless
        allow_special=False, where it is encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True,
                     num_threads: int = 8) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got a single str")
        if allow_special:
            return self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}); got {bad[:5]}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that do not form UTF-8 become U+FFFD."""
        return self._enc.decode(self._check_ids(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(ids))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer (built once per process)."""
    return Tokenizer()

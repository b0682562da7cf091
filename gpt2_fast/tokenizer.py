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


# ---------------------------------------------------------------------------------------------
# HF tokenizer files (vocab.json + merges.txt), rebuilt from the vendored ranks
# ---------------------------------------------------------------------------------------------
# HF's GPT-2 files spell every byte as a printable character (bytes_to_unicode: printable
# Latin-1 bytes map to themselves, the other 68 to U+0100 onwards, so ' ' is 'Ġ' and '\n' 'Ċ').
# A merge is recovered from the ranks as tiktoken builds them: running BPE on a token's bytes
# with only the merges ranked below it leaves exactly two parts, the pair merged into it.

def bytes_to_unicode() -> dict:
    """{byte: printable character}, GPT-2's reversible byte encoding."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_parts(ranks: dict, token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def hf_vocab_and_merges() -> tuple[dict, list[str]]:
    """(vocab.json's {token string: id}, merges.txt's lines) of GPT-2, from the vendored ranks."""
    ranks = load_ranks()
    enc = bytes_to_unicode()
    spell = lambda b: "".join(enc[x] for x in b)
    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        # the merge is one of the splits into two lower-ranked tokens; BPE decides between several
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok))
                  if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank]
        parts = list(splits[0]) if len(splits) == 1 else _bpe_parts(ranks, tok, rank)
        if len(parts) != 2:
            raise ValueError(f"BPE ranks: token {tok!r} (rank {rank}) is not one merge of two lower-ranked tokens")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return vocab, merges


def write_hf_tokenizer_files(directory: str, model_max_length: int = 1024) -> list[str]:
    """Write GPT-2's vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into
    directory (atomically each), so transformers' AutoTokenizer loads the folder offline; returns
    the paths written."""
    import json

    from .atomic import atomic_write
    vocab, merges = hf_vocab_and_merges()
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "add_bos_token": False, "errors": "replace", **special,
              "added_tokens_decoder": {str(EOT_TOKEN): {"content": eot, "lstrip": False, "normalized": True,
                                                        "rstrip": False, "single_word": False, "special": True}}}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
    paths = []
    for name, text in files.items():
        path = os.path.join(directory, name)

        def write(tmp: str, text: str = text) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        atomic_write(path, write)
        paths.append(path)
    return paths

"""Text generation over the static KV cache: prefill once, then one-token decode steps.

Prompts of different lengths are left-padded; `kv_start` tells attention which cache slots are
padding and makes each row's positions count from its first real token, so a row generates
exactly what it would alone. The loop itself is gpt2_fast/engine.py (static step buffers, one
CUDA graph per decode step on GPU); sampling (greedy, temperature, top-k, top-p) runs there on the
model's device, seeded, with no host sync beyond reading the sampled ids. `sample_logits` here is
the plain-PyTorch sampler with a torch.Generator, for callers that hold their own logits.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .tokenizer import EOT_TOKEN, Tokenizer, get_tokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResult:
    tokens: list[list[int]]                 # new tokens of each prompt (stops before <|endoftext|>)
    texts: Optional[list[str]]              # their decoded text, when a tokenizer was given or used
    prompt_tokens: list[list[int]]
    time_to_first_token_s: float = 0.0      # prefill + first sample
    ms_per_token: float = 0.0               # mean time of one decode step after the first token
    tokens_per_s: float = 0.0               # decode steps per second x batch
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"time to first token {self.time_to_first_token_s * 1e3:.1f} ms, "
                f"{self.ms_per_token:.2f} ms/token, {self.tokens_per_s:.1f} tokens/s")


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V) -> ids (B,). temperature 0 (or top_k 1) is greedy.

    top-k keeps the k largest logits; top-p keeps the smallest set of tokens whose probability
    reaches p (the most likely token always stays). Sampling uses the exponential race
    argmax(p / E), E ~ Exp(1), which draws from p without a host sync.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # mass before it reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(dim=-1)


def encode_prompts(prompts: Union[Prompt, Sequence[Prompt], Tensor], tokenizer: Optional[Tokenizer],
                   vocab_size: int) -> list[list[int]]:
    """A str, a list of ids, or a list of either (a batch) -> list of id lists.
    An empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do."""
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                    all(isinstance(p, int) for p in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("expected a prompt (str or list of ids) or a non-empty list of prompts")
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = (tokenizer or get_tokenizer()).encode(p)
        elif isinstance(p, Sequence) and all(isinstance(i, int) for i in p):
            ids = list(p)
        else:
            raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(p).__name__}")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
        out.append(ids or [EOT_TOKEN])
    return out


def left_pad(prompt_ids: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """-> idx (B, T) left-padded with token 0, kv_start (B,) int32 = number of pad slots."""
    T = max(len(p) for p in prompt_ids)
    idx = torch.zeros(len(prompt_ids), T, dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        idx[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    kv_start = torch.tensor([T - len(p) for p in prompt_ids], dtype=torch.int32)
    return idx.to(device), kv_start.to(device)


def generate_ids(model, prompt_ids: list[list[int]], max_new_tokens: int = 50,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, stop_at_eot: bool = True,
                 timings: Optional[dict] = None) -> Iterator[Tensor]:
    """Yield the (B,) ids sampled at each step (rows that have finished keep yielding EOT).

    Stops after max_new_tokens steps, or when every row has produced <|endoftext|>. Runs on the
    model's decode engine (gpt2_fast/engine.py: static buffers, one CUDA graph per step on GPU).
    """
    from .engine import get_engine
    return get_engine(model).generate_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                          seed, stop_at_eot, timings)


def generate(model, prompts, tokenizer: Optional[Tokenizer] = None, max_new_tokens: int = 50,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             seed: Optional[int] = None, stop_at_eot: bool = True) -> GenerationResult:
    """Generate from a prompt or a batch of prompts (str or token ids).

    >>> out = generate(model, "Hello, I'm a language model,", max_new_tokens=20, top_k=50, seed=0)
    >>> print(out.texts[0]); print(out.summary())
    """
    use_text = tokenizer is not None or _has_text(prompts)
    prompt_ids = encode_prompts(prompts, tokenizer, model.config.vocab_size)
    timings: dict = {}
    steps = list(generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                              stop_at_eot, timings))
    new = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompt_ids]
    if stop_at_eot:
        new = [row[:row.index(EOT_TOKEN)] if EOT_TOKEN in row else row for row in new]
    tok = tokenizer or get_tokenizer() if use_text else None
    res = GenerationResult(tokens=new, texts=[tok.decode(r) for r in new] if tok else None,
                           prompt_tokens=prompt_ids, stats=timings)
    res.time_to_first_token_s = timings.get("ttft_s", 0.0)
    if timings.get("decode_steps"):
        res.ms_per_token = timings["decode_s"] / timings["decode_steps"] * 1e3
        res.tokens_per_s = len(prompt_ids) * timings["decode_steps"] / timings["decode_s"]
    return res


def _has_text(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, Sequence) and any(isinstance(p, str) for p in prompts))


def stream(model, prompt: Prompt, tokenizer: Optional[Tokenizer] = None, max_new_tokens: int = 50,
           temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           seed: Optional[int] = None, stop_at_eot: bool = True,
           timings: Optional[dict] = None) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece as it is generated.
    A character split across tokens is held back until its last byte arrives."""
    tok = tokenizer or get_tokenizer()
    prompt_ids = encode_prompts(prompt, tok, model.config.vocab_size)
    if len(prompt_ids) != 1:
        raise ValueError(f"stream takes one prompt, got {len(prompt_ids)}; use generate for batches")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for ids in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                            stop_at_eot, timings):
        t = int(ids[0])
        if stop_at_eot and t == EOT_TOKEN:
            break
        piece = decoder.decode(tok.decode_bytes([t]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail

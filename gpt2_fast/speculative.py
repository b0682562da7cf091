"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy: a small GPT-2 drafts,
the big one verifies, and the output is the big model's own greedy continuation.

One round, with n tokens committed (prompt + generated) and the last one not yet in the target's
cache:
  draft    k one-token steps from the last committed token: d_1 .. d_k. They run on the draft
           engine's static step buffers, so on GPU each is a CUDA-graph replay. (After a round
           that accepted every draft, d_k is first fed to the draft's cache.)
  verify   the target runs ONE forward over [last, d_1 .. d_k]: Tq = k + 1 queries at cache slots
           n-1 .. n-1+k (ops.decode_attention handles Tq > 1), giving its greedy choices
           g_0 .. g_k, where g_i is what it would emit after d_1 .. d_i.
  accept   the longest prefix with d_i == g_{i-1} (a tokens), then g_a: a + 1 tokens per round,
           between 1 and k + 1, each one exactly the target's greedy choice.
Cache slots written past the accepted prefix need no rollback: the static caches are rewritten
at those slots before any query can see them (attention reads only up to the live length).
The host syncs once per round (to learn a); drafts and verification stay on the device.

Exactness: the verify forward computes the same logits as a one-token step up to floating-point
summation order (other matmul shapes), so greedy equality holds except at exact argmax ties.
Only batch 1 and greedy decoding are implemented.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from .engine import SamplingMode, get_engine
from .generate import GenerationResult, Prompt, encode_prompts
from .tokenizer import EOT_TOKEN, Tokenizer, get_tokenizer


class Verifier:
    """The target's verify forward as a fixed-shape step: k + 1 tokens read from the draft's step
    buffer at slots pos .. pos + k (pos a device tensor), greedy choices and the agreeing-prefix
    length written to `out` = [tokens (k+1), g (k+1), a]. On CUDA it is captured once as a graph."""

    def __init__(self, engine, src, k: int):
        device = engine.device
        self.engine, self.src, self.k = engine, src, k
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.arange(k + 1, device=device)
        self.out = torch.zeros(2 * k + 3, dtype=torch.long, device=device)
        self.graph = None

    def _run(self, live: Optional[int] = None) -> None:
        input_pos = self.pos + self.offsets                                     # (k + 1,)
        idx = self.src.seq[:1].index_select(1, input_pos)                       # (1, k + 1)
        g = self.engine.model.forward_cached(idx, input_pos, None, live=live,
                                             only_last=False)[0].argmax(-1)     # (k + 1,)
        agree = (idx[0, 1:] == g[:-1]).to(torch.long).cumprod(0).sum(0, keepdim=True)
        self.out.copy_(torch.cat([idx[0], g, agree]))

    def __call__(self, start: int) -> list[int]:
        """Verify the proposal at slots start .. start + k; one host sync (the result)."""
        self.pos.fill_(start)
        if not self.engine.cuda_graph:
            self._run(live=start + self.k + 1)
        else:
            if self.graph is None:
                self.graph = self.engine.capture(self._run)
            self.graph.replay()
        return self.out.tolist()


def _check_pair(target, draft, k: int) -> None:
    for name, m in (("target", target), ("draft", draft)):
        if not hasattr(m, "forward_cached"):
            raise TypeError(f"{name} must be a gpt2_fast GPT model, got {type(m).__name__}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft and target must share the vocabulary: vocab_size "
                         f"{draft.config.vocab_size} != {target.config.vocab_size}")
    dt, dd = target.transformer.wte.weight.device, draft.transformer.wte.weight.device
    if dt != dd:
        raise ValueError(f"draft and target must be on the same device, got {dd} and {dt}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
        raise ValueError(f"k (tokens drafted per round) must be an int in [1, 32], got {k!r}")


@torch.inference_mode()
def speculative_generate_ids(target, draft, prompt_ids: list[int], max_new_tokens: int = 50,
                             k: int = 4, stop_at_eot: bool = True,
                             stats: Optional[dict] = None) -> Iterator[list[int]]:
    """Yield the target's greedy tokens in chunks of 1..k+1 (one chunk per round).

    stats (if given) receives rounds, drafted, accepted, acceptance_rate, ttft_s, decode_s,
    decode_tokens. Stops after max_new_tokens tokens or at <|endoftext|> (which is yielded).
    """
    _check_pair(target, draft, k)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or \
            not all(isinstance(i, int) for i in prompt_ids):
        raise TypeError("speculative decoding takes one prompt: a non-empty list of int token ids")
    V = target.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got "
                         f"{[i for i in prompt_ids if not 0 <= i < V][:5]}")
    T = len(prompt_ids)
    for name, m in (("target", target), ("draft", draft)):
        if T + max_new_tokens > m.config.block_size:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"{name} model's block_size {m.config.block_size}")
    if max_new_tokens == 0:
        return
    device = target.transformer.wte.weight.device
    # Highest slot ever written: (T + max_new_tokens - 1) - 1, since a round never drafts past
    # the tokens still wanted. The engines own the caches (and re-capture graphs if they move);
    # the draft's one-token steps run on its engine's static buffers (a CUDA graph on GPU).
    needed = T + max_new_tokens - 1
    get_engine(target)._prepare(1, needed)  # first: the draft may be the target itself
    draft_engine = get_engine(draft)
    dbuf = draft_engine._prepare(1, needed)
    greedy = SamplingMode.make(0, None, None, V)
    target_engine = get_engine(target)
    verifier = target_engine.extra_graphs.get(("verify", dbuf, k))
    if verifier is None:
        verifier = target_engine.extra_graphs[("verify", dbuf, k)] = Verifier(target_engine, dbuf, k)
    dbuf.stop.fill_(False)
    dbuf.done.fill_(False)
    dbuf.kv_start.zero_()
    if stats is None:
        stats = {}
    stats.update(rounds=0, drafted=0, accepted=0)

    def forward(model, tokens: torch.Tensor, start: int, only_last: bool = True) -> torch.Tensor:
        """tokens (Tq,) at cache slots start .. start+Tq-1 -> logits (Tq or 1, V)."""
        Tq = tokens.shape[0]
        pos = torch.arange(start, start + Tq, device=device)
        return model.forward_cached(tokens[None], pos, None, live=start + Tq, fresh=start == 0,
                                    only_last=only_last)[0]

    t0 = time.perf_counter()
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    first = int(forward(target, prompt, 0)[-1].argmax())
    forward(draft, prompt, 0)
    seq = list(prompt_ids) + [first]      # committed tokens; the last one is in neither cache yet
    draft_fed = T                          # the draft's cache holds slots [0, draft_fed)
    stats["ttft_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    yield [first]
    produced = 1
    while produced < max_new_tokens and not (stop_at_eot and seq[-1] == EOT_TOKEN):
        n = len(seq)
        k_eff = min(k, max_new_tokens - produced - 1)
        if k_eff > 0:
            if draft_fed < n - 1:  # after a round that accepted every draft: feed the last draft
                forward(draft, torch.tensor(seq[draft_fed:n - 1], device=device), draft_fed)
            dbuf.seq[0, n - 1] = seq[-1]
            dbuf.pos.fill_(n - 1)
            for i in range(k_eff):  # d_i lands in dbuf.seq[0, n - 1 + i]
                draft_engine.run_step(dbuf, greedy, live=n + i)
        if k_eff == k:  # the fixed-shape verify step (a graph replay on CUDA)
            host = verifier(n - 1)
        else:           # the last round(s), with fewer tokens still wanted: eager
            if k_eff > 0:
                proposal = dbuf.seq[0, n - 1:n + k_eff]                             # (k_eff + 1,)
            else:
                proposal = torch.tensor(seq[-1:], device=device)
            g = forward(target, proposal, n - 1, only_last=False).argmax(-1)       # (k_eff + 1,)
            agree = (proposal[1:] == g[:-1]).to(torch.long).cumprod(0).sum(0, keepdim=True)
            host = torch.cat([proposal, g, agree]).tolist()                         # the one sync
        a = host[-1]
        new = host[1:1 + a] + [host[k_eff + 1 + a]]     # d_1 .. d_a, then the target's g_a
        stats["rounds"] += 1
        stats["drafted"] += k_eff
        stats["accepted"] += a
        if k_eff > 0:
            draft_fed = n + min(a, k_eff - 1)
        if stop_at_eot and EOT_TOKEN in new:
            new = new[:new.index(EOT_TOKEN) + 1]
        seq += new
        produced += len(new)
        yield new
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats["decode_s"] = time.perf_counter() - t1
    stats["decode_tokens"] = produced - 1
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0


def speculative_generate(target, draft, prompt: Prompt, tokenizer: Optional[Tokenizer] = None,
                         max_new_tokens: int = 50, k: int = 4,
                         stop_at_eot: bool = True) -> GenerationResult:
    """Greedy generation of `target` for one prompt, drafted by `draft` k tokens at a time.
    result.stats["acceptance_rate"]: accepted / drafted tokens."""
    use_text = tokenizer is not None or isinstance(prompt, str)
    ids = encode_prompts(prompt, tokenizer, target.config.vocab_size)
    if len(ids) != 1:
        raise ValueError(f"speculative decoding takes one prompt, got {len(ids)}")
    stats: dict = {}
    new: list[int] = []
    for chunk in speculative_generate_ids(target, draft, ids[0], max_new_tokens, k, stop_at_eot, stats):
        new += chunk
    new = new[:max_new_tokens]
    if stop_at_eot and EOT_TOKEN in new:
        new = new[:new.index(EOT_TOKEN)]
    tok = (tokenizer or get_tokenizer()) if use_text else None
    res = GenerationResult(tokens=[new], texts=[tok.decode(new)] if tok else None,
                           prompt_tokens=ids, stats=stats)
    res.time_to_first_token_s = stats.get("ttft_s", 0.0)
    if stats.get("decode_tokens"):
        res.ms_per_token = stats["decode_s"] / stats["decode_tokens"] * 1e3
        res.tokens_per_s = stats["decode_tokens"] / stats["decode_s"]
    return res

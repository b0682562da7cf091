"""The decode engine: prefill once, then one fixed-shape step per token, replayed as a CUDA graph.

Design (gpt-fast style, with everything a step needs living in static buffers):

  prefill   the prompts, left-padded to T, run once through GPT.forward_cached: the causal
            flash-attention kernel (ops.attention) when no row is padded, otherwise
            ops.decode_attention with kv_start; the first token is sampled on the device.
  step      reads its input token from `seq[:, pos]`, runs embedding, every block (decode
            attention over the live cache, fused residual-add + LayerNorm), the final LN, the LM
            head on that one position and the sampler, writes the new token to `seq[:, pos + 1]`,
            marks rows that produced <|endoftext|> and increments `pos` in place. Its inputs and
            outputs are all static buffers of one batch-size bucket (1, 2, 4, ... 64), so on CUDA
            one captured torch.cuda.CUDAGraph per (bucket, sampling mode) replays it with no
            Python, no allocation and no host sync; on CPU the very same function runs eagerly
            (with the host-known live length, so attention never touches unused cache slots).
  sampling  greedy / temperature / top-k / top-p on the device; the randomness is a counter-based
            hash of (seed, position, row, token id), so it needs no generator state inside the
            graph and a seed gives the same tokens with and without graphs.
  host      reads tokens only to stream them; checks "every row finished?" every `sync_every`
            steps (1 on CPU, where it is free; 8 on CUDA).

Why torch.cuda.CUDAGraph and not torch.compile(mode="reduce-overhead"): no compile time (tens of
seconds for gpt2-xl), no guards or recompiles across buckets and sampling modes, and the Triton
kernels are captured as they are. Inductor could still fuse the small elementwise ops of a step;
that comparison is unmeasured (no GPU was lent while this was written).

CPU layout: MKL's batch-1 GEMV reads an (in, out)-major weight 1.5-1.9x faster than the
(out, in)-major one nn.Linear keeps (bench: F.linear(x, W) 2.0 ms vs x @ W^T-stored 1.1 ms for
768x3072, 41 vs 28 ms for the LM head, one thread, this 2-core box). So on CPU the engine
re-lays the model's 2-D Linear weights and the tied embedding in place as transposed storage, the
layout HF's Conv1D uses: same shapes, same values, the parameters become non-contiguous views.
That changes the storage of the user's parameters (and so the bits of later training matmuls), so
it is opt-in: `Engine(model, cpu_layout=True)` / `get_engine(model, cpu_layout=True)`, which
`gpt2-fast generate` and the decode benchmarks use on a model loaded only for inference.

The cache is the model's static KV cache (GPT.setup_cache). A graph remembers the addresses of
the cache, the weights and the step buffers: the engine re-captures when any of them changes.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from .identity import tensor_identity, walk_modules
from .tokenizer import EOT_TOKEN

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def batch_bucket(batch_size: int) -> int:
    """The smallest bucket >= batch_size (beyond 64: the next multiple of 64)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    for b in BUCKETS:
        if batch_size <= b:
            return b
    return -(-batch_size // 64) * 64


# ---------------------------------------------------------------------------------------------
# Sampling on the device, graph-safe
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingMode:
    """The static part of a sampling configuration (what changes the captured graph)."""
    greedy: bool
    top_k: Optional[int]
    use_top_p: bool

    @classmethod
    def make(cls, temperature: float, top_k: Optional[int], top_p: Optional[float],
             vocab_size: int) -> "SamplingMode":
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):  # nan too
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        greedy = temperature == 0 or top_k == 1
        top_k = None if greedy or top_k is None or top_k >= vocab_size else top_k
        return cls(greedy, top_k, (not greedy) and top_p is not None and top_p < 1.0)


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) on int64 tensors holding values < 2**32.
    The multiplier is < 2**27, so no product overflows int64 on any device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def exponential_noise(seed: Tensor, counter: Tensor, batch: int, vocab: int) -> Tensor:
    """(batch, vocab) float32 Exp(1) draws, a pure function of (seed, counter, row, column).
    seed, counter: (1,) int64 device tensors (seed < 2**32)."""
    device = seed.device
    h = _mix32((seed + _mix32(counter & _M32)) & _M32)                          # (1,)
    rows = _mix32((h + torch.arange(batch, device=device) * 0x2C1B3C6D) & _M32)  # (B,)
    cols = torch.arange(vocab, device=device) * 0x297A2D39                     # (V,)
    x = _mix32((rows[:, None] + cols[None, :]) & _M32)                          # (B, V)
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))                 # in (0, 1)
    return -torch.log(u)


def sample_on_device(logits: Tensor, mode: SamplingMode, temperature: Tensor, top_p: Tensor,
                     seed: Tensor, counter: Tensor) -> Tensor:
    """logits (B, V) -> ids (B,) int64, the same rules as generate.sample_logits (top-k keeps the
    k largest, top-p the smallest set reaching p, the top token always stays) but with no host
    sync and no generator: temperature, top_p (1,) float32; seed, counter (1,) int64 tensors."""
    if mode.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if mode.top_k is not None:
        kth = torch.topk(logits, mode.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if mode.use_top_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (p.cumsum(dim=-1) - p) >= top_p      # the mass before a token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    e = exponential_noise(seed, counter, logits.shape[0], logits.shape[1])
    return (probs / e).argmax(dim=-1)                        # the exponential race: draws from probs


# ---------------------------------------------------------------------------------------------
# Static buffers of one batch bucket
# ---------------------------------------------------------------------------------------------

class StepBuffers:
    """Everything the decode step reads and writes, at fixed addresses."""

    def __init__(self, bucket: int, seq_len: int, device: torch.device):
        self.bucket, self.seq_len = bucket, seq_len
        self.seq = torch.zeros(bucket, seq_len + 1, dtype=torch.long, device=device)  # tokens by slot
        self.pos = torch.zeros(1, dtype=torch.long, device=device)       # slot of the step's input
        self.kv_start = torch.zeros(bucket, dtype=torch.int32, device=device)
        self.done = torch.zeros(bucket, dtype=torch.bool, device=device)
        self.stop = torch.zeros(1, dtype=torch.bool, device=device)      # stop_at_eot
        self.seed = torch.zeros(1, dtype=torch.long, device=device)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        self.graphs: dict = {}                                           # SamplingMode -> CUDAGraph


def _check_model(model) -> None:
    if not hasattr(model, "forward_cached") or not hasattr(model, "setup_cache"):
        raise TypeError(f"expected a gpt2_fast GPT model, got {type(model).__name__}")


def relayout_for_cpu_decode(model) -> int:
    """Store every 2-D nn.Linear / token-embedding weight (in, out)-major, in place (the tensor
    keeps its (out, in) shape as a transposed view). Returns how many were changed."""
    changed = 0
    with torch.no_grad():
        for mod in model.modules():
            if mod is getattr(model.transformer, "wpe", None):
                continue  # positions are gathered row by row and have no GEMV
            w = getattr(mod, "weight", None)
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and isinstance(w, torch.Tensor) \
                    and w.dim() == 2 and w.device.type == "cpu" and w.is_contiguous() and w.shape[1] > 1:
                w.data = w.data.t().contiguous().t()
                changed += 1
        if not getattr(model, "_gpt2_fast_owned", False):  # the rest off the checkpoint's file mapping,
            for t in itertools.chain(model.parameters(), model.buffers()):  # so it is not resident twice
                if t.device.type == "cpu" and t.is_contiguous():
                    t.data = t.data.clone()
            model._gpt2_fast_owned = True
    return changed


class Engine:
    """Fast generation for one GPT model (the model's weights are used in place, never copied).

    cuda_graph: None = on when the model is on CUDA. max_seq_len: the KV cache length on CUDA
    (default block_size: one cache, graphs reused across calls); on CPU the cache grows to what a
    call needs. sync_every: how often the host checks whether every row finished. cpu_layout:
    re-lay CPU weights for batch-1 GEMV (see the module docstring).
    """

    def __init__(self, model, cuda_graph: Optional[bool] = None, max_seq_len: Optional[int] = None,
                 sync_every: Optional[int] = None, cpu_layout: bool = False,
                 decode_step: Optional[str] = None):
        _check_model(model)
        self.model = model
        # what finished and spare rows feed back: EOT, or 0 where the vocabulary has no EOT id
        self._filler = EOT_TOKEN if model.config.vocab_size > EOT_TOKEN else 0
        self.device = model.transformer.wte.weight.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on CUDA, this one is on {self.device}")
        self.cuda_graph = bool(cuda_graph)
        bs = model.config.block_size
        if max_seq_len is not None and not 0 < max_seq_len <= bs:
            raise ValueError(f"max_seq_len must be in [1, block_size={bs}], got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.sync_every = sync_every or (8 if self.device.type == "cuda" else 1)
        self.cpu_layout = cpu_layout
        self._buffers: dict[int, StepBuffers] = {}
        self._identity = None
        self._pool = None
        self.extra_graphs: dict = {}  # other static-buffer graphs on this model (speculative verify)
        # decode_step: "unfused" | "fused" (gpt2_fast/decode_fused.py); None = choices.py's, resolved
        # in _prepare, like the runner of a CUDA step (decode_runner: "graph" | "compile")
        from .choices import choice
        self._requested_step, self.step_kind, self._fused = decode_step, None, None
        self._cpu = None  # gpt2_fast.cpu_decode.CpuDecoder: on CPU the whole forward is one C++ call
        self.decode_runner = choice("decode_runner")

    # -- buffers, cache and graph bookkeeping -------------------------------------------------

    def _prepare(self, batch: int, needed: int) -> StepBuffers:
        """Cache and step buffers for `batch` rows and `needed` cache slots (host checks here)."""
        m = self.model
        self.device = m.transformer.wte.weight.device
        bucket = batch_bucket(batch)
        cache_len = self.max_seq_len or (m.config.block_size if self.cuda_graph else needed)
        if needed > cache_len:
            raise ValueError(f"KV cache overflow: this generation needs {needed} cache slots (prompt + "
                             f"max_new_tokens - 1) but the engine's cache holds max_seq_len={cache_len}")
        from .choices import choice
        from .cpu_decode import cpu_decoder_for, kv_cache_dtype, unsupported_reason
        cpu_step = self.device.type == "cpu" and (self._requested_step or choice("decode_step")) != "fused" \
            and unsupported_reason(m) is None  # CPU: the whole forward in one C++ call (cpu_decode.py)
        dtype = kv_cache_dtype(m) if cpu_step else m.transformer.wte.weight.dtype  # the C++ step's: fp32 / bf16
        cache = getattr(m.transformer.h[0].attn, "kv_cache", None)
        ok = (cache is not None and m.max_batch_size >= bucket and m.max_seq_len >= cache_len and
              cache.k_cache.dtype == dtype and cache.k_cache.device == self.device)
        with torch.inference_mode(False):  # normal tensors: the model stays usable outside inference mode
            if self.cpu_layout and self.device.type == "cpu":
                relayout_for_cpu_decode(m)
            self._cpu = cpu_decoder_for(m, self._cpu) if cpu_step else None
            if not ok:
                m.setup_cache(max(bucket, m.max_batch_size), max(cache_len, m.max_seq_len), dtype=dtype)
            mods = walk_modules(m)
            identity = (tensor_identity(mods), tuple(getattr(b, "backend", None) for b in mods), dtype,
                        str(self.device))  # the caches are buffers: a new cache changes it too
            if identity != self._identity:  # new weights, cache or backend: old graphs are stale
                self._buffers.clear()
                self.extra_graphs.clear()
                self._identity = identity
                from .decode_fused import FusedDecodeStep, resolve_step
                self.step_kind = resolve_step(self._requested_step, self.device)
                self._fused = FusedDecodeStep(m) if self.step_kind == "fused" else None
            buf = self._buffers.get(bucket)
            if buf is None or buf.seq_len < m.max_seq_len:
                buf = self._buffers[bucket] = StepBuffers(bucket, m.max_seq_len, self.device)
        return buf

    def _step(self, buf: StepBuffers, mode: SamplingMode, live: Optional[int] = None) -> None:
        """One decode step on the static buffers; what the CUDA graph captures."""
        if self._fused is not None:
            return self._fused(buf, mode)
        pos = buf.pos                                                        # (1,)
        tok = buf.seq.index_select(1, pos)                                   # (Bb, 1)
        if self._cpu is not None:  # live is the host-known slot count on CPU: the input sits at live - 1
            logits = self._cpu.forward(tok, live - 1, buf.kv_start)          # (Bb, V)
            if mode.greedy and self._cpu.has_advance:  # the lines below in one C++ call (cold after the weights)
                return self._cpu.advance_greedy(logits, buf.seq, pos, buf.done, buf.stop, self._filler, EOT_TOKEN)
        else:
            logits = self.model.forward_cached(tok, pos, buf.kv_start, live=live)[:, -1]  # (Bb, V)
        nxt = sample_on_device(logits, mode, buf.temperature, buf.top_p, buf.seed, pos)
        nxt = torch.where(buf.done, torch.full_like(nxt, self._filler), nxt)  # finished rows keep EOT
        buf.seq.index_copy_(1, pos + 1, nxt[:, None])
        buf.done |= (nxt == EOT_TOKEN) & buf.stop
        buf.pos += 1

    def _capture(self, buf: StepBuffers, mode: SamplingMode):
        """Record _step as a CUDA graph. The warm-up runs write only the slots the real step
        rewrites first; pos and done are put back after each."""
        pos0, done0 = buf.pos.clone(), buf.done.clone()

        def reset():
            buf.pos.copy_(pos0)
            buf.done.copy_(done0)
        if self.decode_runner == "compile":
            from .decode_fused import compiled_runner
            return compiled_runner(lambda: self._step(buf, mode), self.device, reset)
        return self.capture(lambda: self._step(buf, mode), reset)

    def capture(self, fn, reset=None):
        """A torch.cuda.CUDAGraph of fn() (which must only touch static tensors), sharing this
        engine's memory pool. Warm-up runs (Triton autotuning, lazy init) go first on a side
        stream; reset() undoes each of them."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
                if reset is not None:
                    reset()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        if reset is not None:
            reset()
        self._pool = graph.pool()
        return graph

    def run_step(self, buf: StepBuffers, mode: SamplingMode, live: Optional[int]) -> None:
        if not self.cuda_graph:
            self._step(buf, mode, live)
            return
        graph = buf.graphs.get(mode)
        if graph is None:
            graph = buf.graphs[mode] = self._capture(buf, mode)
        graph.replay()

    # -- prefill ------------------------------------------------------------------------------

    def prefill(self, prompt_ids: list[list[int]]) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
        """Run the left-padded prompts through the model, filling the cache slots [0, T).
        -> (last-position logits (B, V), idx (B, T), kv_start (B,) int32 or None if unpadded, T)."""
        from .generate import left_pad
        T = max(len(p) for p in prompt_ids)
        idx, kv_start = left_pad(prompt_ids, self.device)
        if self._cpu is not None:
            kv_start = None if all(len(p) == T for p in prompt_ids) else kv_start
            return self._cpu.forward(idx, 0, kv_start), idx, kv_start, T
        input_pos = torch.arange(T, device=self.device)
        if all(len(p) == T for p in prompt_ids):
            logits = self.model.forward_cached(idx, input_pos, None, fresh=True)
            kv_start = None
        else:
            logits = self.model.forward_cached(idx, input_pos, kv_start, live=T)
        return logits[:, -1], idx, kv_start, T

    # -- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int = 50,
                     temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, seed: Optional[int] = None,
                     stop_at_eot: bool = True, timings: Optional[dict] = None) -> Iterator[Tensor]:
        """Yield the (B,) ids sampled at each step (rows that have finished yield EOT).

        Stops after max_new_tokens steps, or once every row has produced <|endoftext|> (noticed
        within sync_every steps: on CUDA a few all-EOT steps may follow).
        """
        cfg = self.model.config
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("expected a non-empty list of non-empty prompts (token id lists)")
        mode = SamplingMode.make(temperature, top_k, top_p, cfg.vocab_size)
        B, T = len(prompt_ids), max(len(p) for p in prompt_ids)
        if T + max_new_tokens > cfg.block_size:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"block_size {cfg.block_size}; shorten the prompt or ask for fewer tokens")
        for p in prompt_ids:
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got "
                                 f"{[i for i in p if not 0 <= i < cfg.vocab_size][:5]}")
        if max_new_tokens == 0:
            return
        buf = self._prepare(B, T + max_new_tokens - 1)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        buf.seed.fill_(seed & _M32)
        buf.temperature.fill_(max(float(temperature), 1e-6))
        buf.top_p.fill_(1.0 if top_p is None else float(top_p))
        buf.stop.fill_(bool(stop_at_eot))

        t0 = time.perf_counter()
        logits, idx, kv_start, T = self.prefill(prompt_ids)
        counter = torch.full((1,), T - 1, dtype=torch.long, device=self.device)
        first = sample_on_device(logits, mode, buf.temperature, buf.top_p, buf.seed, counter)
        # the step buffers: real rows first, the bucket's spare rows see only their own slot
        buf.seq.zero_()
        buf.seq[:B, :T] = idx
        buf.seq[:B, T] = first
        buf.kv_start.fill_(T)
        buf.kv_start[:B] = 0 if kv_start is None else kv_start
        buf.done.fill_(True)
        buf.done[:B] = (first == EOT_TOKEN) & buf.stop
        buf.pos.fill_(T)
        if timings is not None:
            _sync(self.device)
            timings["ttft_s"] = time.perf_counter() - t0
            timings["decode_steps"] = 0
            t1 = time.perf_counter()
        yield first
        steps = 0
        for step in range(1, max_new_tokens):
            if stop_at_eot and step % self.sync_every == 0 and bool(buf.done.all()):
                break
            self.run_step(buf, mode, live=T + step)
            steps += 1
            yield buf.seq[:B, T + step].clone()
        if timings is not None:
            _sync(self.device)
            timings["decode_s"] = time.perf_counter() - t1
            timings["decode_steps"] = steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_engine(model, **kwargs) -> Engine:
    """The model's engine, created on first use and kept with the model (its graphs and buffers
    are reused by later calls); kwargs, when given, replace it with a new one, and so does moving
    the model to another device."""
    _check_model(model)
    engine = model.__dict__.get("_gpt2_fast_engine")
    if engine is None or kwargs or engine.device != model.transformer.wte.weight.device:
        engine = Engine(model, **kwargs)
        model.__dict__["_gpt2_fast_engine"] = engine
    return engine

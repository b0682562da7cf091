"""CPU inference in one compiled call per token: the fused forward of csrc/cpu/decode_step.cpp.

On CPU a decode step of the Python model issues ~1,100 small ops (~15 ms of dispatch for gpt2);
`torch.ops.gpt2_fast.cpu_gpt2_forward` runs embedding, every block (LN -> QKV -> cache write ->
attention over the live cache -> projection + residual -> LN -> fc + GELU -> projection + residual),
the final LN and the LM head of the last position in C++, with the small-batch GEMV kernels of
csrc/cpu/gemv.cpp (fp32 / bf16 / int8 weights read in place, fp32 activations) for up to 8 rows and
ATen's GEMM beyond (prefill: MKL's sgemm for fp32; with low-precision activations oneDNN's bf16 GEMM
for bf16 weights and its int8 GEMM, x as symmetric int8 per row, for int8 weights). The engine (gpt2_fast/engine.py) uses it on CPU for the prefill and
every step, and samples from the logits it returns as before.

Weights are read where the model keeps them, no copy: nn.Linear weights in either layout
(the engine's (in, out)-major cpu_layout or nn.Linear's own), Int8Linear's int8 weight + scales
(gpt2_fast/quant.py), the tied embedding as the LM head. Only small tensors (biases, LayerNorm,
positions) are passed as fp32 (copies only for a bf16 model: a few MB). The KV cache is the
model's own static cache: fp32, or bf16 for a bf16 model (kv_cache_dtype).

GPT2_FAST_CPU_FUSED=0 turns it off (the engine then runs the Python step);
GPT2_FAST_CPU_ISA=portable|avx2|avx512 caps the kernels' instruction set;
Low-precision activations (lowp_act) round the activations entering int8 / bf16 (N, K)-stored
weights to 8 bits per sign (per-row scale: W8A8, AVX512-VNNI) / bf16 (AVX512-BF16), for fewer
instructions per weight. Default: on. On a 4 x 256 GPT-2 trained on KJV (the demo's), over 64 steps
of 8 rows, the median max-logit error vs the fp32 model was 0.0357 for W8A8 vs 0.0332 weight-only
int8, 0.0139 for bf16 activations vs 0.0128 with fp32 ones (the bf16 weights' own rounding is most
of it), perplexity within 0.005% of fp32 for all four; a bf16 step ran 10-23% faster with them
(bench/cpu_decode_peers.py, same runs). GPT2_FAST_CPU_LOWP_ACT=0 keeps fp32 activations (the
weight-only kernels), as does CpuDecoder(lowp_act=False); fp32 weights ignore the flag.
CPUs without VNNI / AVX512-BF16 ignore it (bench/cpu_decode_peers.py measures every mode).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

_FLOAT = (torch.float32, torch.bfloat16)


def _op(name: str):
    """torch.ops.gpt2_fast.<name> from the compiled extension, or None where it is not built."""
    from . import extension
    if extension.unavailable_reason("cpu") is not None:
        return None
    return getattr(torch.ops.gpt2_fast, name, None) if hasattr(torch.ops, "gpt2_fast") else None


def cpu_isa() -> Optional[str]:
    """The instruction set the CPU kernels run here (avx512, avx2, portable), None without them."""
    op = _op("cpu_isa")
    return op(-1) if op is not None else None


def _f32(t: Optional[Tensor]) -> Tensor:
    """A small vector as contiguous fp32 (the same tensor when it already is), empty for None."""
    if t is None:
        return torch.empty(0)
    return t.detach().float().contiguous()


def _linear_tensors(lin) -> list[Tensor]:
    """[weight, scale or empty, bias or empty] of an nn.Linear or a quant.Int8Linear."""
    from .quant import Int8Linear
    if isinstance(lin, Int8Linear):
        return [lin.weight_int8, lin.scale.float().contiguous(), _f32(lin.bias)]
    return [lin.weight.detach(), torch.empty(0), _f32(lin.bias)]


def unsupported_reason(model) -> Optional[str]:
    """None when CpuDecoder can run this model, else why not."""
    if os.environ.get("GPT2_FAST_CPU_FUSED") == "0":
        return "GPT2_FAST_CPU_FUSED=0"
    if _op("cpu_gpt2_forward") is None:
        return "the compiled extension (gpt2_fast._C) with cpu_gpt2_forward is not available"
    from .quant import Int8Linear
    wte = model.transformer.wte.weight
    if wte.device.type != "cpu" or wte.dtype not in _FLOAT:
        return f"needs a float32 or bfloat16 model on CPU, got {wte.dtype} on {wte.device}"
    for block in model.transformer.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            if not isinstance(lin, (torch.nn.Linear, Int8Linear)):
                return f"unsupported projection {type(lin).__name__}"
            if isinstance(lin, torch.nn.Linear) and lin.weight.dtype not in _FLOAT:
                return f"unsupported weight dtype {lin.weight.dtype}"
    if not isinstance(model.lm_head, (torch.nn.Linear, Int8Linear)):
        return f"unsupported LM head {type(model.lm_head).__name__}"
    return None


class CpuDecoder:
    """The flat tensor lists of one model for cpu_gpt2_forward, built once (call `fresh` to know
    whether the model's tensors are still the ones packed)."""

    def __init__(self, model, isa: int = -1, lowp_act: Optional[bool] = None):
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"CpuDecoder: {why}")
        self.model, self.isa = model, isa
        self.lowp_act = _lowp_from_env() if lowp_act is None else bool(lowp_act)
        self._op = _op("cpu_gpt2_forward")
        self._key = self._identity()
        t, cfg = model.transformer, model.config
        from .quant import Int8Embedding
        lm = _linear_tensors(model.lm_head)
        # an int8 embedding's rows are the LM head's: the op scales them by the head's scales
        wte = model.lm_head.weight_int8 if isinstance(t.wte, Int8Embedding) else t.wte.weight.detach()
        self.globals = [wte, _f32(t.wpe.weight), _f32(t.ln_f.weight), _f32(t.ln_f.bias), lm[0], lm[1]]
        self.layers: list[Tensor] = []
        for b in t.h:
            self.layers += [_f32(b.ln_1.weight), _f32(b.ln_1.bias), *_linear_tensors(b.attn.c_attn),
                            *_linear_tensors(b.attn.c_proj), _f32(b.ln_2.weight), _f32(b.ln_2.bias),
                            *_linear_tensors(b.mlp.c_fc), *_linear_tensors(b.mlp.c_proj)]
        self.n_head, self.vocab, self.eps = cfg.n_head, cfg.vocab_size, cfg.layer_norm_epsilon
        self._attn = [b.attn for b in t.h]
        self._advance = _op("cpu_greedy_advance")
        self.has_advance = self._advance is not None  # False only with an extension built before it

    def advance_greedy(self, logits: Tensor, seq: Tensor, pos: Tensor, done: Tensor, stop: Tensor,
                       filler: int, eot: int) -> None:
        """The rest of a greedy engine step in one call (csrc/cpu/greedy_advance.cpp): per row
        nxt = filler if done else argmax(logits); seq[:, pos + 1] = nxt; done |= (nxt == eot) & stop;
        pos += 1. The same values as the ATen ops it replaces (torch.argmax's tie and NaN rules)."""
        self._advance(logits, seq, pos, done, stop, filler, eot)

    def _identity(self) -> tuple:
        """The model's tensors but its KV caches (they are read per call, not packed)."""
        from .identity import tensor_identity, walk_modules
        from .model import KVCache
        return tensor_identity(walk_modules(self.model), skip=(KVCache,))

    def fresh(self) -> bool:
        """True while the model holds the very tensors packed here."""
        return self._identity() == self._key

    def forward(self, idx: Tensor, start: int, kv_start: Optional[Tensor] = None,
                all_logits: bool = False) -> Tensor:
        """idx (B, T) int64 at cache slots [start, start + T) (kv_start (B,): padding slots per row)
        -> fp32 logits (B, vocab) of the last position, or (B, T, vocab) with all_logits. Uses and
        fills the model's KV cache (model.setup_cache(..., dtype=torch.float32 or torch.bfloat16) first)."""
        # the module dicts, not attribute access: nn.Module.__getattr__ on 24 modules and 24 buffers ran
        # cold after every step's weight stream (~100 us a token, 1% of an int8 step)
        caches = [a._modules["kv_cache"] for a in self._attn]
        kc = [c._buffers["k_cache"] for c in caches]
        vc = [c._buffers["v_cache"] for c in caches]
        return self._op(idx.contiguous(), start, kv_start, self.globals, self.layers, kc, vc, self.n_head,
                        self.vocab, self.eps, all_logits, self.isa, self.lowp_act)


def _lowp_from_env() -> bool:
    env = os.environ.get("GPT2_FAST_CPU_LOWP_ACT", "1")
    if env not in ("0", "1"):
        raise ValueError(f"GPT2_FAST_CPU_LOWP_ACT must be 0 or 1, got {env!r}")
    return env == "1"


def kv_cache_dtype(model) -> torch.dtype:
    """The KV cache dtype the engine gives cpu_gpt2_forward: the model's float dtype, as the Python
    path's setup_cache gives it: bf16 for a bf16 model (half the bytes attention reads per token:
    x0.5 attention time at long contexts), fp32 otherwise, int8 models included: with a bf16 cache
    the W8A8 gpt2 of bench/cpu_decode_peers.py (random weights, near-tied logits) left the fp32
    model's greedy tokens at token 60 of 128 (at 830 live slots it ran 0.78x the time).
    GPT2_FAST_CPU_KV=fp32|bf16 forces one."""
    env = os.environ.get("GPT2_FAST_CPU_KV", "")
    if env not in ("", "fp32", "bf16"):
        raise ValueError(f"GPT2_FAST_CPU_KV must be fp32 or bf16, got {env!r}")
    if env:
        return torch.bfloat16 if env == "bf16" else torch.float32
    return torch.bfloat16 if model.transformer.wte.weight.dtype == torch.bfloat16 else torch.float32


def cpu_decoder_for(model, previous: Optional[CpuDecoder] = None) -> Optional[CpuDecoder]:
    """The CpuDecoder the engine should use for `model` (reusing `previous` while it is fresh),
    or None when the model cannot run through it (the engine then runs the Python step)."""
    if previous is not None and previous.model is model and previous.fresh():
        return previous
    if unsupported_reason(model) is not None:
        return None
    _trim_heap()
    return CpuDecoder(model)


def pack_for_cpu_inference(model, huge_pages: bool = True):
    """The packing step for an inference-only CPU model (call once after loading / quantizing):
    every CPU parameter and buffer becomes a contiguous copy, i.e. (out, in) rows for the weights,
    the layout the GEMV kernels stream with prefetch (measured ~8% faster than the engine's
    (in, out) cpu_layout for gpt2 fp32), all in one anonymous memory arena, so nothing still views
    the checkpoint's file mapping and the weights are resident once. huge_pages: the arena is
    madvise(MADV_HUGEPAGE)d (Linux transparent huge pages in "madvise" mode): a decode step streams
    every weight from memory, and 2 MiB pages spare the TLB misses of 4 KiB ones (int8 gpt2 step
    ~12.5 vs ~14 ms, one thread, here). Tied tensors stay tied. An int8 model whose LM head was
    quantized from the tied token embedding (quantize_int8 on GPT-2) reads its token rows from that
    int8 head (quant.Int8Embedding: row * its scale) and the float table is dropped: 147 MiB less
    for gpt2 fp32, the model's only float copy of a large weight. Returns the model."""
    import itertools
    import mmap
    _embed_from_int8_head(model)
    def key(t):  # tied tensors share one copy; a view of another shape gets its own
        return t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())

    tensors, seen = [], set()
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type == "cpu" and t.numel() and key(t) not in seen:
            seen.add(key(t))
            tensors.append(t)
    align = 4096
    sizes = [-(-t.numel() * t.element_size() // align) * align for t in tensors]
    total = sum(sizes)
    if total == 0:
        return model
    arena = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # no transparent huge pages here: 4 KiB pages, same values
    buf = torch.frombuffer(arena, dtype=torch.uint8)  # keeps the mapping alive with the tensors
    new_of, off = {}, 0
    with torch.no_grad():
        for t, size in zip(tensors, sizes):
            n = t.numel() * t.element_size()
            dst = buf[off:off + n].view(t.dtype).view(t.shape)
            dst.copy_(t.data)
            new_of[key(t)] = dst
            off += size
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.data = new_of[key(t)]
    _trim_heap()
    return model


def _embed_from_int8_head(model) -> None:
    """wte -> quant.Int8Embedding of the LM head when the head is int8 and was quantized from wte."""
    from .quant import Int8Embedding, Int8Linear
    wte, head = model.transformer.wte, model.lm_head
    if isinstance(head, Int8Linear) and isinstance(wte, torch.nn.Embedding) \
            and getattr(head, "quantized_from", None) is wte.weight and wte.weight.device.type == "cpu":
        model.transformer.wte = Int8Embedding(head, wte.weight.dtype)
        object.__setattr__(head, "quantized_from", None)  # the float table's last reference


def _trim_heap() -> None:
    """Give the pages freed by a re-layout / quantization back to the OS (glibc keeps freed blocks
    under its 32 MiB mmap threshold in the heap, where they would stay resident)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

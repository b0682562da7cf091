"""The fused decode step (gpt2_fast/decode_fused.py) and its kernels (kernels/decode_gemv.py,
kernels/sampler.py): each kernel against torch, the sampler against the engine's sampler with the
same seed, and the fused step's tokens against the unfused step (greedy and seeded sampling,
ragged left-padded batches, buckets 1/2/4/8, bf16, int8). Small shapes: the interpreter is slow."""
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.engine import Engine, SamplingMode, sample_on_device
from gpt2_fast.quant import quantize_int8, quantize_weight
from gpt2_fast.reference import bias_gelu_ref, decode_attention_ref, layer_norm_ref
from lively import lively
from tolerance import assert_close_triton

pytest.importorskip("triton")
G = pytest.importorskip("gpt2_fast.kernels.decode_gemv")
S = pytest.importorskip("gpt2_fast.kernels.sampler")

def _nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _linear_ref(x, w, b, scale=None, round_bias=True):
    """The unfused step's Linear: F.linear in x's dtype (int8: Int8Linear's torch path)."""
    if scale is None:
        return F.linear(x, w.to(x.dtype), b if round_bias else None)
    y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
    return y + b.to(x.dtype) if (b is not None and round_bias) else y


# ---------------------------------------------------------------------------------------------
# GEMV family
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_gemv_variants_match_torch(device, dtype, int8):
    M, K, N = 3, 40, 37                       # odd: every mask is exercised
    x = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N + 3, K, device=device) / math.sqrt(K)  # rows past N are never read
    scale = None
    if int8:
        w, scale = quantize_weight(w)
    else:
        w = w.to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    lnw, lnb = (1 + 0.1 * torch.randn(K, device=device)).to(dtype), (0.1 * torch.randn(K, device=device)).to(dtype)
    s = None if scale is None else scale[:N]

    def refs(cast):  # cast: to float64 for the exact reference, identity for torch in dtype
        xs, ws, bs = cast(x), w[:N] if int8 else cast(w[:N]), cast(b)
        h = layer_norm_ref(xs, cast(lnw), cast(lnb), 1e-5)
        return dict(ln_gelu=bias_gelu_ref(_linear_ref(h, ws, bs, s, round_bias=False), bs),
                    residual=cast(x[:, :N] * 0.5) + _linear_ref(xs, ws, bs, s),
                    plain=_linear_ref(xs, ws, None, s))
    ref_hi, ref_lo = refs(lambda t: t.double()), refs(lambda t: t)
    y = _nan(M, N, dtype=dtype, device=device)
    G.gemv(x, w, y, scale, b, ln=(lnw, lnb, 1e-5), gelu=True)
    assert_close_triton(y, ref_hi["ln_gelu"], ref_lo["ln_gelu"], "ln + gemv + bias + gelu")
    y = (x[:, :N] * 0.5).contiguous()
    G.gemv(x, w, y, scale, b, residual=True)
    assert_close_triton(y, ref_hi["residual"], ref_lo["residual"], "gemv + bias + residual")
    y = _nan(M, N, dtype=dtype, device=device)
    G.gemv(x, w, y, scale)
    assert_close_triton(y, ref_hi["plain"], ref_lo["plain"], "gemv")


@pytest.mark.parametrize("dtype,int8", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)])
def test_qkv_gemv_writes_q_and_the_cache_slot(device, dtype, int8):
    M, C, H, Smax, pos = 3, 32, 2, 9, 5
    D = C // H
    x = torch.randn(M, C, device=device).to(dtype)
    w = torch.randn(3 * C, C, device=device) / math.sqrt(C)
    scale = None
    if int8:
        w, scale = quantize_weight(w)
    else:
        w = w.to(dtype)
    b = torch.randn(3 * C, device=device).to(dtype)
    lnw, lnb = torch.randn(C, device=device).to(dtype), torch.randn(C, device=device).to(dtype)
    k_cache = torch.randn(M + 1, H, Smax, D, device=device).to(dtype)   # a spare cache row
    v_cache = torch.randn(M + 1, H, Smax, D, device=device).to(dtype)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q = _nan(M, C, dtype=dtype, device=device)
    G.qkv_gemv(x, w, (lnw, lnb, 1e-5), q, k_cache, v_cache, torch.tensor([pos], device=device), scale, b)

    def ref(cast):
        qkv = _linear_ref(layer_norm_ref(cast(x), cast(lnw), cast(lnb), 1e-5), w if int8 else cast(w),
                          cast(b), scale)
        return qkv.split(C, dim=1)
    (qh, kh, vh), (ql, kl, vl) = ref(lambda t: t.double()), ref(lambda t: t)
    assert_close_triton(q, qh, ql, "q")
    heads = lambda t: t.view(M, H, D)  # noqa: E731
    assert_close_triton(k_cache[:M, :, pos], heads(kh), heads(kl), "k slot")
    assert_close_triton(v_cache[:M, :, pos], heads(vh), heads(vl), "v slot")
    k0[:M, :, pos], v0[:M, :, pos] = k_cache[:M, :, pos], v_cache[:M, :, pos]
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0), "wrote outside the slot"


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("splits,pos", [(1, 7), (3, 5), (3, 40)])
def test_attn_decode_matches_reference(device, dtype, splits, pos):
    """One split, several splits with a short live range (split 0 alone), several with the
    combine (pos 40: chunks of 16 under the interpreter); ragged kv_start, a spare cache row."""
    M, H, D, Smax = 3, 2, 16, 48
    q = torch.randn(M, H * D, device=device).to(dtype)
    k_cache = torch.randn(M + 1, H, Smax, D, device=device).to(dtype)
    v_cache = torch.randn(M + 1, H, Smax, D, device=device).to(dtype)
    kv_start = torch.tensor([0, 3, pos], dtype=torch.int32, device=device)
    y = _nan(M, H * D, dtype=dtype, device=device)
    ws = G.attn_workspace(M, H, D, splits, device)
    for _ in range(2):  # twice: the arrival counters must be back at 0
        G.attn_decode(q, k_cache, v_cache, torch.tensor([pos], device=device), kv_start, y, ws, splits, D ** -0.5)
    assert torch.equal(ws[2], torch.zeros_like(ws[2]))
    kv_len = torch.full((M,), pos + 1, device=device)

    def ref(up):
        o = decode_attention_ref(q.view(M, H, 1, D), k_cache[:M], v_cache[:M], kv_len, kv_start, upcast=up)
        return o.reshape(M, H * D)
    assert_close_triton(y, ref(True), ref(False), "attention")


def test_embed_gathers_token_and_position(device):
    seq = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 50256]], device=device)
    wte, wpe = torch.randn(11, 8, device=device), torch.randn(6, 8, device=device)
    x = _nan(2, 8, dtype=torch.float32, device=device)
    G.embed(seq, torch.tensor([3], device=device), torch.tensor([1, 0], dtype=torch.int32, device=device),
            wte, wpe, x)
    torch.testing.assert_close(x[0], wte[8] + wpe[2])
    torch.testing.assert_close(x[1], wte[10] + wpe[3])  # an id past wte reads its last row


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------

MODES = [(0.0, None, None), (0.7, None, None), (1.3, 10, None), (0.9, None, 0.8), (1.0, 25, 0.7),
         (2.0, 3, 0.99), (1.0, 96, 0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_sampler_equals_engine_sampler(device, dtype):
    """Same tokens as engine.sample_on_device for the same seed and counter, every mode."""
    B, V = 4, 97
    g = torch.Generator().manual_seed(0)
    for trial in (0, 2) if dtype == torch.bfloat16 else (2,):
        logits = (3 * torch.randn(B, V, generator=g)).to(dtype).to(device)
        if trial == 2:
            logits[:, 10:20] = logits[:, 10:11]   # ties, at the top too
            logits[:, 10] += 50
        seed = torch.tensor([1000 + trial], device=device)
        counter = torch.tensor([7 * trial + 1], device=device)
        for t, k, p in MODES:
            mode = SamplingMode.make(t, k, p, V)
            temp = torch.tensor([max(t, 1e-6)], device=device)
            top_p = torch.tensor([1.0 if p is None else p], device=device)
            ref = sample_on_device(logits, mode, temp, top_p, seed, counter)
            got = S.sample(logits, mode.greedy, mode.top_k, mode.use_top_p, temp, top_p, seed, counter)
            assert torch.equal(got, ref), (trial, t, k, p)


def test_sampler_equals_engine_sampler_across_blocks(device):
    """A vocabulary of several BLOCK_V chunks (and 4-bit radix passes, as on a GPU)."""
    B, V = 2, 4099
    logits = 4 * torch.randn(B, V, generator=torch.Generator().manual_seed(1)).to(device)
    seed, counter = torch.tensor([5], device=device), torch.tensor([11], device=device)
    for t, k, p in [(0.0, None, None), (1.0, 700, 0.6)]:
        mode = SamplingMode.make(t, k, p, V)
        temp, top_p = torch.tensor([max(t, 1e-6)], device=device), torch.tensor([p or 1.0], device=device)
        ref = sample_on_device(logits, mode, temp, top_p, seed, counter)
        got = S.sample(logits, mode.greedy, mode.top_k, mode.use_top_p, temp, top_p, seed, counter)
        assert torch.equal(got, ref), (t, k, p)


def test_sampler_step_epilogue_writes_seq_and_done(device):
    logits = torch.randn(3, 97, device=device)
    logits[1, 42] = 100.0
    seq = torch.zeros(3, 8, dtype=torch.long, device=device)
    done = torch.tensor([False, False, True], device=device)
    pos, one = torch.tensor([4], device=device), torch.ones(1, device=device)
    S.sample(logits, True, None, False, one, one, pos, pos,
             step=(seq, pos, done, torch.tensor([True], device=device), 42))
    assert seq[:, 5].tolist() == [int(logits[0].argmax()), 42, 42]
    assert done.tolist() == [False, True, True]
    assert int(seq[:, :5].abs().sum()) == 0 and int(seq[:, 6:].abs().sum()) == 0


# ---------------------------------------------------------------------------------------------
# the fused step in the engine
# ---------------------------------------------------------------------------------------------

def tiny_model(device, dtype=torch.float32, n_layer=2, n_embd=64, n_head=4, vocab=97, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, block_size=64,
                      backend="torch")).eval()
    with torch.no_grad():
        lively(m, 100.0)
    return m.to(device=device, dtype=dtype)


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=True)
def _module_step_on_cpu(monkeypatch):
    """"unfused" = the engine's module-by-module step (the GPU's), not the CPU engine's C++ call."""
    monkeypatch.setenv("GPT2_FAST_CPU_FUSED", "0")


def tokens(model, step, prompts, n, **kw):
    kw.setdefault("temperature", 0)  # greedy unless asked
    engine = Engine(model, cuda_graph=False, decode_step=step)
    out = torch.stack(list(engine.generate_ids(prompts, n, stop_at_eot=False, **kw)), 1).tolist()
    assert engine.step_kind == step
    return out


SAMPLED = dict(temperature=0.8, top_k=30, top_p=0.9, seed=3)


@pytest.mark.parametrize("kw", [dict(temperature=0), pytest.param(SAMPLED, marks=pytest.mark.slow)],
                         ids=["greedy", "sampled"])
def test_fused_step_equals_unfused_ragged_bucket4(device, kw):
    model = tiny_model(device)
    prompts = prompts_of([3, 7, 1, 5], 97)   # left-padded, bucket 4
    assert tokens(model, "fused", prompts, 5, **kw) == tokens(model, "unfused", prompts, 5, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [[4], [6, 2], [2, 7, 3, 5, 1, 8, 4, 6]], ids=["b1", "b2", "b8"])
@pytest.mark.parametrize("kw", [dict(temperature=0), SAMPLED, dict(temperature=1.2, seed=9)],
                         ids=["greedy", "topk_topp", "temperature"])
def test_fused_step_equals_unfused_every_bucket(device, lengths, kw):
    model = tiny_model(device)
    prompts = prompts_of(lengths, 97, seed=len(lengths))
    assert tokens(model, "fused", prompts, 8, **kw) == tokens(model, "unfused", prompts, 8, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(temperature=0), SAMPLED], ids=["greedy", "sampled"])
def test_fused_step_equals_unfused_int8(device, kw):
    model = quantize_int8(tiny_model(device))
    prompts = prompts_of([5, 2], 97)
    assert tokens(model, "fused", prompts, 8, **kw) == tokens(model, "unfused", prompts, 8, **kw)


@pytest.mark.slow
def test_fused_step_long_context_uses_the_combine(device):
    """Past 16 live slots (the interpreter's chunk) attention splits and combines in one launch."""
    model = tiny_model(device, n_head=2, n_embd=32)
    prompts = prompts_of([20], 97)
    assert tokens(model, "fused", prompts, 12) == tokens(model, "unfused", prompts, 12)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_half_tracks_unfused(device, dtype):
    """16-bit: GEMV sums run in another order than torch's, so near-ties may flip; most agree
    (here all do: the kernels round where the unfused step stores)."""
    model = tiny_model(device, dtype=dtype)
    prompts = prompts_of([3, 6], 97)
    a, b = tokens(model, "fused", prompts, 8), tokens(model, "unfused", prompts, 8)
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert agree >= 12, (a, b)


def test_fused_step_choice_and_errors(monkeypatch):
    model = tiny_model("cpu", n_layer=1, n_embd=32, n_head=2)
    monkeypatch.setenv("GPT2_FAST_DECODE_STEP", "fused")
    engine = Engine(model, cuda_graph=False)
    engine._prepare(1, 4)
    assert engine.step_kind == "fused" and engine._fused is not None
    monkeypatch.setenv("GPT2_FAST_DECODE_STEP", "bogus")
    with pytest.raises(ValueError, match="GPT2_FAST_DECODE_STEP"):
        Engine(model, cuda_graph=False)._prepare(1, 4)
    with pytest.raises(ValueError, match="decode_step must be one of"):
        Engine(model, cuda_graph=False, decode_step="fast")._prepare(1, 4)
    monkeypatch.setenv("GPT2_FAST_DECODE_STEP", "fused")
    monkeypatch.setenv("GPT2_FAST_INT8_MATMUL", "dequant")
    with pytest.raises(NotImplementedError, match="GPT2_FAST_INT8_MATMUL=dequant"):
        Engine(quantize_int8(model), cuda_graph=False)._prepare(1, 4)


@pytest.mark.slow
def test_fused_step_equals_unfused_bucket64(device):
    """The largest bucket: 64 ragged rows (GEMV row blocks, a 64-row sampler grid). Full: a spare
    row's EOT (50256) is no token of this 97-word model, and the unfused step's embedding rejects it."""
    model = tiny_model(device, n_embd=32, n_head=2, n_layer=1)
    prompts = prompts_of([1 + i % 7 for i in range(64)], 97, seed=64)
    for kw in (dict(temperature=0), SAMPLED):
        assert tokens(model, "fused", prompts, 3, **kw) == tokens(model, "unfused", prompts, 3, **kw), kw

"""Int8 weight-only quantization (gpt2_fast/quant.py): per-channel error bounds, the fused Triton
GEMV against a float64 reference, and perplexity on the bundled KJV corpus within 1% of float
(with a 3-bit control that must miss the bound, so the test can fail)."""
import gzip
import math
import os

import pytest
import torch
import torch.nn.functional as F

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.engine import Engine
from tolerance import assert_close_to_ref

from gpt2_fast.quant import (Int8Linear, int8_linear_fwd, quantize_int8, quantize_weight,
                             weight_bytes)

# The fused kernel runs on CUDA, or on CPU under the interpreter (tests/conftest.py sets it there)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if torch.cuda.is_available() else [])
KJV = os.path.join(os.path.dirname(__file__), "..", "gpt2_fast", "data", "kjv.txt.gz")


@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (64, 768), (3, 1001)])
def test_quantize_weight_error_bound(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w[0, -1] = 0.0 if shape[1] > 1 else w[0, -1]
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (shape[0],) and q.abs().max() <= 127
    deq = q.float() * s[:, None]
    assert ((deq - w).abs() <= s[:, None] / 2 + 1e-7).all()       # round to nearest: half a step
    assert torch.allclose(q.abs().amax(1).float(), torch.full((shape[0],), 127.0))  # full range used
    zero_q, zero_s = quantize_weight(torch.zeros(2, 3))
    assert (zero_q == 0).all() and torch.isfinite(zero_s).all()


def test_int8_linear_matches_its_dequantized_weight_and_bounds_the_error():
    lin = torch.nn.Linear(300, 77)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(5, 3, 300)
    y = m(x)
    ref = F.linear(x.double(), m.weight.double(), lin.bias.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    # vs the float layer: |x . (w - w_q s)| <= sum_k |x_k| s_n / 2
    bound = x.abs().sum(-1, keepdim=True) * m.scale / 2
    assert ((y - lin(x)).abs() <= bound + 1e-5).all()
    torch.testing.assert_close(m.matmul(x), y - lin.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last dim 300"):
        m(torch.randn(2, 299))
    m.kernel = "cuda"
    with pytest.raises(ValueError, match="kernel must be one of"):
        m(x)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 37, 50), (3, 100, 300), (2, 64, 768), (16, 17, 129)])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_triton_int8_gemv_vs_float64(M, N, K, has_bias, dtype):
    """The fused kernel (interpreted on CPU) against float64 math on the same int8 weights."""
    dev = TRITON_DEVICE
    x = torch.randn(M, K, device=dev).to(dtype)
    q, s = quantize_weight(torch.randn(N, K, device=dev))
    b = torch.randn(N, device=dev).to(dtype) if has_bias else None
    y = int8_linear_fwd(x, q, s, b)
    assert y.dtype == dtype
    ref = (x.double() @ q.double().T) * s.double()
    lo = (x @ q.to(dtype).T) * s.to(dtype)
    if has_bias:
        ref, lo = ref + b.double(), lo + b
    assert_close_to_ref(y, ref, lo, "int8 gemv")


def test_triton_path_inside_the_layer():
    lin = torch.nn.Linear(96, 40).to(TRITON_DEVICE)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(2, 1, 96, device=TRITON_DEVICE)
    m.kernel = "torch"
    a = m(x)
    m.kernel = "triton"
    torch.testing.assert_close(m(x), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.matmul(x), a - lin.bias, atol=1e-5, rtol=1e-5)


def test_model_to_dtype_keeps_int8_weights_and_fp32_scales():
    lin = torch.nn.Linear(64, 48)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(3, 64)
    ref = m(x)
    m.to(torch.bfloat16)
    assert m.weight_int8.dtype == torch.int8 and m.scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    m64 = Int8Linear.from_linear(lin).to(torch.float64)
    assert m64.scale.dtype == torch.float32 and m64.bias.dtype == torch.float64
    torch.testing.assert_close(m64(x.double()), ref.double(), atol=1e-5, rtol=1e-5)


def test_int8_linear_bad_inputs():
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_weight(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.zeros(2, 2), bits=9)
    q, s = quantize_weight(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"x \(M, K\)"):
        int8_linear_fwd(torch.randn(2, 7), q, s)
    with pytest.raises(ValueError, match="int8 weight"):
        int8_linear_fwd(torch.randn(2, 8), q.float(), s)


def make_model(seed=0, vocab=1000):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab, block_size=64)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(100.0)  # the blocks, not the tied embedding, decide the next token
    return m


def test_quantized_model_generates_like_its_own_full_forward():
    model = quantize_int8(make_model())
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.weight_int8.shape == model.transformer.wte.weight.shape
    prompts = [[5, 6, 7, 8], [9, 10]]
    steps = list(Engine(model).generate_ids(prompts, 8, temperature=0, stop_at_eot=False))
    got = torch.stack(steps, 1).tolist()
    for p, row in zip(prompts, got):
        ids = list(p)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert row == ids[len(p):]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(model)


def test_weight_bytes_shrink():
    m = make_model()
    before = weight_bytes(m)
    after = weight_bytes(quantize_int8(m))
    assert 0.24 * before < after < 0.3 * before  # fp32 -> int8 + scales + float biases/LNs


# -- perplexity on the bundled corpus -------------------------------------------------------------

def kjv_ids(n_chars):
    if not os.path.exists(KJV):
        pytest.skip(f"the bundled corpus is missing: {KJV}")
    from gpt2_fast.tokenizer import get_tokenizer
    with gzip.open(KJV, "rt", encoding="utf-8") as f:
        text = f.read(n_chars)
    return get_tokenizer().encode(text)


def perplexity(model, ids, block):
    n = (len(ids) - 1) // block * block
    x = torch.tensor(ids[:n]).view(-1, block)
    y = torch.tensor(ids[1:n + 1]).view(-1, block)
    with torch.no_grad():
        losses = [model(xb, targets=yb)[1] for xb, yb in zip(x.split(32), y.split(32))]
    return math.exp(torch.stack(losses).mean().item())


@pytest.fixture(scope="module")
def trained_on_kjv():
    """A tiny GPT-2 trained for 60 steps on the first 60K characters of KJV, over a compact
    vocabulary (the token types of the sample, so the softmax stays small), and held-out ids.
    One thread: on a shared 2-core machine that is several times faster than two."""
    ids = kjv_ids(60_000)
    types = sorted(set(ids))
    remap = {t: i for i, t in enumerate(types)}
    ids = [remap[t] for t in ids]
    split = int(len(ids) * 0.9)
    train, held_out = ids[:split], ids[split:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=len(types), block_size=32,
                              backend="torch"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        data = torch.tensor(train)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(60):
            starts = torch.randint(0, len(train) - 33, (16,), generator=g)
            xb = torch.stack([data[s:s + 32] for s in starts])
            yb = torch.stack([data[s + 1:s + 33] for s in starts])
            _, loss = model(xb, targets=yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), held_out, len(types)


def test_int8_perplexity_within_1_percent_on_kjv(trained_on_kjv):
    model, held_out, vocab = trained_on_kjv
    base = perplexity(model, held_out, 32)
    assert base < vocab / 3, f"the model did not learn anything (ppl {base:.0f}, vocab {vocab})"
    ppl8 = perplexity(_quantized_copy(model, bits=8), held_out, 32)
    assert abs(ppl8 / base - 1) < 0.01, f"int8 perplexity {ppl8:.3f} vs float {base:.3f}"
    # the control: 2-bit weights through the same path must miss the 1% bound
    ppl2 = perplexity(_quantized_copy(model, bits=2), held_out, 32)
    assert abs(ppl2 / base - 1) > 0.01, f"2-bit perplexity {ppl2:.3f} vs float {base:.3f}"


def _quantized_copy(model, bits):
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return quantize_int8(copy, bits=bits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the fused kernel need a GPU")
def test_int8_engine_on_cuda_graph_equals_eager():
    model = quantize_int8(make_model().cuda().to(torch.bfloat16))
    assert model.lm_head.scale.dtype == torch.float32
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = list(Engine(model, cuda_graph=True).generate_ids(prompts, 10, temperature=0, stop_at_eot=False))
    b = list(Engine(model, cuda_graph=False).generate_ids(prompts, 10, temperature=0, stop_at_eot=False))
    assert torch.equal(torch.stack(a), torch.stack(b))


# -- the same bound through the fused C++ CPU step (gpt2_fast/cpu_decode.py), token by token -----

def _has_cpu_step():
    try:
        from gpt2_fast import extension
        return extension.unavailable_reason("cpu") is None and hasattr(torch.ops.gpt2_fast, "cpu_gpt2_forward")
    except ImportError:
        return False


def stepwise_perplexity(model, ids, block, rows=8, lowp_act=None):
    """Perplexity from decode steps of the fused CPU forward (8 rows a step: the GEMV kernels and
    the KV cache, as generation runs them)."""
    from gpt2_fast.cpu_decode import CpuDecoder
    n = (len(ids) - 1) // block * block
    x = torch.tensor(ids[:n]).view(-1, block)
    y = torch.tensor(ids[1:n + 1]).view(-1, block)
    model.setup_cache(rows, block, dtype=torch.float32)
    dec = CpuDecoder(model, lowp_act=lowp_act)  # None: the default (W8A8 for int8 on VNNI CPUs)
    losses = []
    for xb, yb in zip(x.split(rows), y.split(rows)):
        for t in range(block):
            logits = dec.forward(xb[:, t:t + 1].contiguous(), t)
            losses.append(F.cross_entropy(logits, yb[:, t], reduction="none"))
    model.clear_cache()
    return math.exp(torch.cat(losses).mean().item())


@pytest.mark.skipif(not _has_cpu_step(), reason="the compiled extension with cpu_gpt2_forward is not built")
def test_cpu_step_perplexity_of_int8_and_bf16_within_1_percent(trained_on_kjv):
    model, held_out, vocab = trained_on_kjv
    held_out = held_out[:16 * 32 + 1]  # 16 rows: one batch of perplexity(), 2 of 8 rows here
    base = perplexity(model, held_out, 32)
    f32 = stepwise_perplexity(_float_copy(model), held_out, 32)
    assert abs(f32 / base - 1) < 1e-4, f"fused fp32 perplexity {f32:.4f} vs the model's {base:.4f}"
    bf16 = stepwise_perplexity(_float_copy(model).to(torch.bfloat16), held_out, 32)  # bf16 activations
    assert abs(bf16 / base - 1) < 0.01, f"bf16 perplexity {bf16:.3f} vs float {base:.3f}"
    bw = stepwise_perplexity(_float_copy(model).to(torch.bfloat16), held_out, 32, lowp_act=False)
    assert abs(bw / base - 1) < 0.01, f"bf16 weight-only perplexity {bw:.3f} vs float {base:.3f}"
    int8 = stepwise_perplexity(_quantized_copy(model, bits=8), held_out, 32)
    assert abs(int8 / base - 1) < 0.01, f"int8 perplexity {int8:.3f} vs float {base:.3f}"
    from gpt2_fast.cpu_decode import pack_for_cpu_inference  # token rows from the int8 LM head too
    packed = stepwise_perplexity(pack_for_cpu_inference(_quantized_copy(model, bits=8)), held_out, 32)
    assert abs(packed / base - 1) < 0.01, f"packed int8 perplexity {packed:.3f} vs float {base:.3f}"
    w8 = stepwise_perplexity(_quantized_copy(model, bits=8), held_out, 32, lowp_act=False)  # weight-only
    assert abs(w8 / base - 1) < 0.01, f"int8 weight-only perplexity {w8:.3f} vs float {base:.3f}"
    int2 = stepwise_perplexity(_quantized_copy(model, bits=2), held_out, 32)  # the control
    assert abs(int2 / base - 1) > 0.01, f"2-bit perplexity {int2:.3f} vs float {base:.3f}"


def _float_copy(model):
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy

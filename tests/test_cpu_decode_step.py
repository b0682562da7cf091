"""The fused CPU forward (csrc/cpu/decode_step.cpp via gpt2_fast/cpu_decode.py): the engine's tokens
with it == without it (greedy, seeded sampling, ragged left-padded batches) == HF transformers'
greedy tokens for fp32; its logits == the Python model's for fp32, bf16 and int8 weights on every
instruction set this CPU runs; bad inputs give clear errors."""
import copy

import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.engine import Engine
from gpt2_fast.quant import quantize_int8
from lively import lively
from test_cpu_gemv import runnable_isas  # one probe of the ISAs the extension was built with

ext = pytest.importorskip("gpt2_fast.extension")
if ext.unavailable_reason("cpu") or not hasattr(torch.ops.gpt2_fast, "cpu_gpt2_forward"):
    pytest.skip("the compiled extension with cpu_gpt2_forward is not built", allow_module_level=True)

from gpt2_fast.cpu_decode import CpuDecoder  # noqa: E402


def make_model(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=2000, block_size=64)).eval()
    with torch.no_grad():
        lively(m, 100.0)
    return m


@pytest.fixture(scope="module")
def model():
    return make_model()


def tokens(engine, prompts, n, **kw):
    kw.setdefault("temperature", 0)
    return torch.stack(list(engine.generate_ids(prompts, n, stop_at_eot=False, **kw)), 1).tolist()


# 4 rows: a full batch bucket (a bucket's spare rows would feed <|endoftext|>, outside this vocab)
PROMPTS = [[464, 1290, 318, 257, 922, 1110], [40, 588], [1212, 318, 257], [7, 1999, 3, 4, 5]]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=40, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_fused_engine_equals_python_engine(model, monkeypatch, sampling):
    fused = Engine(model)
    got = tokens(fused, PROMPTS, 12, **sampling)
    got1 = tokens(fused, PROMPTS[:1], 12, **sampling)
    assert fused._cpu is not None, "the engine did not take the C++ path"
    monkeypatch.setenv("GPT2_FAST_CPU_FUSED", "0")
    plain = Engine(model)
    assert tokens(plain, PROMPTS, 12, **sampling) == got
    assert tokens(plain, PROMPTS[:1], 12, **sampling) == got1
    assert plain._cpu is None


def test_fused_greedy_equals_hf(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ours = tokens(Engine(model), PROMPTS[:1], 16)[0]
    with torch.no_grad():
        ids = torch.tensor(PROMPTS[:1])
        for _ in range(16):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ours == ids[0, len(PROMPTS[0]):].tolist()


def fused_logits(m, idx, isa=-1):
    m.setup_cache(idx.shape[0], idx.shape[1], dtype=torch.float32)
    return CpuDecoder(m, isa=isa, lowp_act=False).forward(idx, 0, all_logits=True)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_fused_logits_equal_python_forward(model, kind):
    """Prefill of 9 rows' worth (GEMM path) and a 1-row decode step (GEMV path) on each ISA, against
    the Python model on the very same weight values in fp32."""
    m = copy.deepcopy(model)
    if kind == "bf16":
        m = m.to(torch.bfloat16)
        ref_model = copy.deepcopy(m).float()          # the bf16-rounded weights, computed in fp32
    elif kind == "int8":
        m = quantize_int8(m)
        ref_model = m
        for mod in m.modules():
            if hasattr(mod, "weight_int8"):
                mod.kernel = "torch"                  # dequantize + F.linear: the independent path
    else:
        ref_model = m
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 2000, (1, 9), generator=g)
    with torch.no_grad():
        ref = ref_model(idx)[0].float()               # (1, 9, V)
    for isa in runnable_isas():
        got = fused_logits(m, idx, isa)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 if kind != "fp32" else 2e-4)
        # decode: the last token alone after a prefill of the first 8 (the GEMV path)
        dec = CpuDecoder(m, isa=isa, lowp_act=False)    # fp32 activations: the weight-only kernels
        dec.forward(idx[:, :8], 0)
        step = dec.forward(idx[:, 8:], 8)
        torch.testing.assert_close(step, ref[:, -1], rtol=1e-4, atol=1e-3 if kind != "fp32" else 2e-4)


def test_head_dim_64_attention_on_every_isa_over_long_and_ragged_caches(monkeypatch):
    """head_dim 64, every GPT-2 size's (the AVX-512 attention path, csrc/cpu/attend_row.cpp; the
    fixture's head_dim is 16): decode steps over 41..46 live slots (the 4-slot loop, its tail and
    the prefetch distance) equal the Python forward on each ISA, and a ragged left-padded batch
    (kv_start > 0) gives the Python engine's tokens."""
    torch.manual_seed(3)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=500, block_size=64)).eval()
    with torch.no_grad():
        lively(m, 100.0)
        idx = torch.randint(0, 500, (2, 46), generator=torch.Generator().manual_seed(4))
        ref = m(idx)[0]                                  # (2, 46, V)
    for isa in runnable_isas():
        m.setup_cache(2, 46, dtype=torch.float32)
        dec = CpuDecoder(m, isa=isa, lowp_act=False)
        dec.forward(idx[:, :40], 0)
        for t in range(40, 46):
            torch.testing.assert_close(dec.forward(idx[:, t:t + 1], t), ref[:, t], rtol=1e-4, atol=2e-4)
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(100, 117))]
    got = tokens(Engine(m), prompts, 8)
    monkeypatch.setenv("GPT2_FAST_CPU_FUSED", "0")
    assert tokens(Engine(m), prompts, 8) == got


@pytest.mark.parametrize("n_embd,n_head", [(64, 4), (128, 2)], ids=["head_dim16", "head_dim64"])
def test_bf16_kv_cache_stays_close_to_fp32_on_every_isa(n_embd, n_head):
    """The same prefill + decode steps with a bf16 KV cache (generic and AVX-512 attention paths)
    against the fp32 cache: bf16 rounding of k and v only."""
    torch.manual_seed(6)
    m = GPT(GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd, vocab_size=500, block_size=64)).eval()
    with torch.no_grad():
        lively(m, 100.0)
    idx = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(7))
    for isa in runnable_isas():
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            m.setup_cache(2, 30, dtype=dtype)
            dec = CpuDecoder(m, isa=isa, lowp_act=False)
            first = dec.forward(idx[:, :24], 0, all_logits=True)
            out[dtype] = torch.cat([first] + [dec.forward(idx[:, t:t + 1], t)[:, None] for t in range(24, 30)], 1)
            assert m.transformer.h[0].attn.kv_cache.k_cache.dtype == dtype
        ref = out[torch.float32]
        err = (out[torch.bfloat16] - ref).abs().max() / ref.abs().max()
        assert 0 < err <= 0.006, (isa, float(err))  # measured 0.2%; 0: the bf16 cache was not used


def test_kv_cache_dtype_is_the_models_float_dtype(monkeypatch):
    from gpt2_fast.cpu_decode import kv_cache_dtype, pack_for_cpu_inference
    monkeypatch.delenv("GPT2_FAST_CPU_KV", raising=False)
    fp32, bf16 = make_model(), make_model().to(torch.bfloat16)
    int8 = pack_for_cpu_inference(quantize_int8(make_model()))   # its wte: an Int8Embedding
    assert kv_cache_dtype(fp32) == kv_cache_dtype(int8) == torch.float32
    assert kv_cache_dtype(bf16) == torch.bfloat16
    monkeypatch.setenv("GPT2_FAST_CPU_KV", "bf16")
    assert kv_cache_dtype(fp32) == torch.bfloat16
    monkeypatch.setenv("GPT2_FAST_CPU_KV", "fp32")
    assert kv_cache_dtype(bf16) == torch.float32
    monkeypatch.setenv("GPT2_FAST_CPU_KV", "half")
    with pytest.raises(ValueError, match="GPT2_FAST_CPU_KV must be fp32 or bf16"):
        kv_cache_dtype(fp32)
    monkeypatch.delenv("GPT2_FAST_CPU_KV")
    for m, want in ((bf16, torch.bfloat16), (int8, torch.float32)):  # what the engine allocates
        engine = Engine(m)
        tokens(engine, PROMPTS[:1], 3)
        assert engine._cpu is not None and m.transformer.h[0].attn.kv_cache.k_cache.dtype == want


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_generate_inside_autocast_gives_the_same_tokens(kind):
    """A caller's torch.autocast does not reach the C++ forward's prefill GEMMs (a 20-token prompt:
    the ATen GEMM path): an fp32 model inside autocast(bf16) crashed ('expected scalar type Float but
    found BFloat16'); every dtype gives the tokens it gives outside autocast."""
    from gpt2_fast.cpu_decode import pack_for_cpu_inference
    m = make_model()
    if kind == "bf16":
        m = m.to(torch.bfloat16)
    elif kind == "int8":
        m = pack_for_cpu_inference(quantize_int8(m))
    engine, prompt = Engine(m), [list(range(3, 23))]
    want = tokens(engine, prompt, 6)
    assert engine._cpu is not None
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert tokens(engine, prompt, 6) == want, dtype


def test_fused_forward_rejects_bad_inputs(model):
    m = copy.deepcopy(model)
    m.setup_cache(1, 8, dtype=torch.float32)
    dec = CpuDecoder(m)
    with pytest.raises(RuntimeError, match="outside"):
        dec.forward(torch.tensor([[2000]]), 0)
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        dec.forward(torch.tensor([[1, 2]]), 7)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        CpuDecoder(copy.deepcopy(model).half())


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_lowp_prefill_through_aten_gemm_stays_close(model, kind):
    """A bf16 / int8 model's prefill beyond the GEMV's 8 rows with low-precision activations runs
    ATen's bf16 GEMM / int8 GEMM (gemv.cpp's linear: oneDNN, a bf16 result / x as symmetric int8):
    all its logits and the next decode step stay close to the Python model on the same weights in
    fp32, and the weight-only path (fp32 activations) stays exact."""
    m = copy.deepcopy(model)
    if kind == "bf16":
        m = m.to(torch.bfloat16)
        ref_model = copy.deepcopy(m).float()
    else:
        m = ref_model = quantize_int8(m)
    idx = torch.randint(0, 2000, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for mod in ref_model.modules():
            if hasattr(mod, "weight_int8"):
                mod.kernel = "torch"                  # dequantize + F.linear: the independent path
        ref = ref_model(idx)[0]
    # measured, of the largest logit: bf16 0.8%, int8 1.8% (int8 x in the prefill, 8 bits per sign
    # in decode: 1.0% with the GEMV kernels' prefill); fp32 activations 7e-7
    lowp_tol = {"bf16": 0.02, "int8": 0.03}[kind]
    for lowp in (True, False):
        m.setup_cache(2, 21, dtype=torch.float32)
        dec = CpuDecoder(m, lowp_act=lowp)
        got = dec.forward(idx[:, :20], 0, all_logits=True)
        step = dec.forward(idx[:, 20:], 20)
        tol = ref.abs().max() * (lowp_tol if lowp else 1e-4)
        assert (got - ref[:, :20]).abs().max() <= tol, lowp
        assert (step - ref[:, 20]).abs().max() <= tol, lowp


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_lowp_activations_stay_close_to_weight_only(model, kind, monkeypatch):
    monkeypatch.delenv("GPT2_FAST_CPU_LOWP_ACT", raising=False)
    m = copy.deepcopy(model)
    m = m.to(torch.bfloat16) if kind == "bf16" else quantize_int8(m)
    idx = torch.randint(0, 2000, (1, 9), generator=torch.Generator().manual_seed(2))
    m.setup_cache(1, 9, dtype=torch.float32)
    exact = CpuDecoder(m, lowp_act=False).forward(idx[:, :8], 0)
    exact = CpuDecoder(m, lowp_act=False).forward(idx[:, 8:], 8)
    CpuDecoder(m, lowp_act=True).forward(idx[:, :8], 0)
    lowp = CpuDecoder(m, lowp_act=True).forward(idx[:, 8:], 8)
    assert (lowp - exact).abs().max() <= 0.05 * exact.abs().max()
    assert CpuDecoder(m).lowp_act is True  # the default: W8A8 / bf16 activations
    monkeypatch.setenv("GPT2_FAST_CPU_LOWP_ACT", "0")
    assert CpuDecoder(m).lowp_act is False
    monkeypatch.setenv("GPT2_FAST_CPU_LOWP_ACT", "yes")
    with pytest.raises(ValueError, match="GPT2_FAST_CPU_LOWP_ACT must be 0 or 1"):
        CpuDecoder(m)


def test_pack_for_cpu_inference_keeps_values_ties_and_tokens(model):
    from gpt2_fast.cpu_decode import pack_for_cpu_inference
    from gpt2_fast.engine import relayout_for_cpu_decode
    m = copy.deepcopy(model)
    before = tokens(Engine(m), PROMPTS, 6)
    relayout_for_cpu_decode(m)                     # (in, out) storage, as cpu_layout leaves it
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert pack_for_cpu_inference(m) is m
    assert all(p.is_contiguous() for p in m.parameters())
    assert m.lm_head.weight is m.transformer.wte.weight
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert tokens(Engine(m), PROMPTS, 6) == before


@pytest.mark.parametrize("kind", ["fp32", "int8", "int8_w8a8"])
def test_decode_step_is_bitwise_independent_of_threads(model, kind, monkeypatch):
    """The one-region decode step computes every output column whole on one thread, in chunks whose
    boundaries do not depend on the thread count: the logits of 1, 2, 3 and 5 threads (more than
    this box's cores: the waits' sleep path) are the same bits."""
    monkeypatch.setenv("GPT2_FAST_CPU_DEMOTE", "0")  # every call on all its threads, however slow
    m = copy.deepcopy(model)
    if kind.startswith("int8"):
        quantize_int8(m)
    idx = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            m.setup_cache(2, 12, dtype=torch.float32)
            dec = CpuDecoder(m, lowp_act=kind == "int8_w8a8")
            steps = [dec.forward(idx[:, :4], 0)] + [dec.forward(idx[:, t:t + 1], t) for t in range(4, 12)]
            outs.append(torch.stack(steps))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_engine_reuses_its_cpu_decoder_until_the_weights_change():
    """The packed tensor lists are reused across generate calls (the cache's own tensors do not
    count as a change) and rebuilt when a weight is replaced; the new weights are then the ones used."""
    m = make_model(5)
    eng = Engine(m)
    first = tokens(eng, PROMPTS[:1], 6)
    dec = eng._cpu
    assert dec is not None and dec.fresh()
    assert tokens(eng, PROMPTS[:1], 6) == first and eng._cpu is dec
    other = make_model(6)
    with torch.no_grad():
        m.lm_head.weight = other.lm_head.weight          # tied: wte and the head change together
        m.transformer.wte.weight = m.lm_head.weight
    assert not dec.fresh()
    got = tokens(eng, PROMPTS[:1], 6)
    assert eng._cpu is not dec
    with torch.no_grad():
        ref = copy.deepcopy(m)
    assert got == tokens(Engine(ref), PROMPTS[:1], 6) and got != first


def test_packed_int8_model_reads_token_rows_from_its_int8_lm_head(monkeypatch):
    """quantize_int8 then pack_for_cpu_inference on a tied model: the token embedding becomes the int8
    head's rows times their scales and the float (V, C) table is gone; the Python forward, the Python
    engine and the fused C++ step all use those rows (same tokens), within int8's error of before."""
    from gpt2_fast.cpu_decode import pack_for_cpu_inference
    from gpt2_fast.quant import Int8Embedding
    m = quantize_int8(make_model(7))
    V, C = m.config.vocab_size, m.config.n_embd
    idx = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        before = m(idx)[0]
    pack_for_cpu_inference(m)
    wte = m.transformer.wte
    assert isinstance(wte, Int8Embedding) and wte.weight.dtype == torch.float32 and wte.weight.numel() == 0
    assert not any(t.is_floating_point() and tuple(t.shape) == (V, C) for t in (*m.parameters(), *m.buffers()))
    ids = torch.tensor([[0, 5, V - 1]])
    torch.testing.assert_close(wte(ids), m.lm_head.weight_int8[ids].float() * m.lm_head.scale[ids][..., None])
    with torch.no_grad():
        after = m(idx)[0]
    assert (after - before).abs().max() <= 0.02 * before.abs().max()  # the embedding's int8 rounding
    fused = tokens(Engine(m), PROMPTS, 8)
    monkeypatch.setenv("GPT2_FAST_CPU_FUSED", "0")
    plain = Engine(m)
    assert tokens(plain, PROMPTS, 8) == fused and plain._cpu is None
    # an untied or unquantized head keeps the float table
    u = quantize_int8(make_model(7), lm_head=False)
    pack_for_cpu_inference(u)
    assert isinstance(u.transformer.wte, torch.nn.Embedding)


def test_fused_gpu_step_refuses_an_int8_embedding():
    """The GPU fused decode step reads wte as a float table: a packed int8 model is refused by name."""
    from gpt2_fast.cpu_decode import pack_for_cpu_inference
    from gpt2_fast.decode_fused import FusedDecodeStep
    m = pack_for_cpu_inference(quantize_int8(make_model(8)))
    with pytest.raises(TypeError, match="Int8Embedding"):
        FusedDecodeStep(m)

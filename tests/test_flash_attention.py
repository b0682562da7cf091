"""kernels/flash_attention.py (attention) vs reference.attention_ref: forward, dq, dk, dv, dropout.

Shapes stay small on CPU (Triton interpreter): the interpreter config uses BLOCK_M=64,
BLOCK_N=32 (forward, dq) and 32/64 (dk, dv), so T = 17 is one partial block and T = 129 spans
several blocks with a one-element tail on both axes; T = 1023 runs unmarked on CUDA only.
"""
import math
import os

import pytest
import torch

from gpt2_fast import poison
from gpt2_fast.reference import attention_ref
from tolerance import assert_close_to_ref

ON_CUDA = torch.cuda.is_available()
SLOW_ON_CPU = [] if ON_CUDA else [pytest.mark.slow]


def _skip_unless_triton(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")


@pytest.fixture
def fa(device):
    _skip_unless_triton(device)
    from gpt2_fast.kernels import flash_attention as mod
    return mod


def _qkv(B, H, Tq, Tk, D, dtype, device):
    q = torch.randn(B, H, Tq, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, H, Tk, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, H, Tk, D, device=device).to(dtype).requires_grad_()
    return q, k, v


def _check(fa, q, k, v, causal, scale=None, do=None):
    """Output and the three gradients against the fp64 reference, next to torch in q's dtype."""
    o = fa.attention(q, k, v, causal=causal, scale=scale)
    assert o.shape == q.shape and o.dtype == q.dtype
    do = torch.randn_like(o) if do is None else do
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_lo = attention_ref(q, k, v, causal=causal, scale=scale)
    g_lo = torch.autograd.grad(o_lo, (q, k, v), do)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_hi = attention_ref(*hi, causal=causal, scale=scale, upcast=True)
    g_hi = torch.autograd.grad(o_hi, hi, do.double())
    assert_close_to_ref(o, o_hi, o_lo, "o")
    for name, g, gh, gl in zip(("dq", "dk", "dv"), grads, g_hi, g_lo):
        assert_close_to_ref(g, gh, gl, name)


def test_poison_is_on():
    assert poison.ENABLED, "tests/conftest.py must set GPT2_FAST_POISON=1 before gpt2_fast is imported"


# (B, H, T): one query, one partial block, several blocks with ragged tails
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,H,T", [(2, 2, 1), (2, 2, 17), (1, 1, 129)])
def test_attention_fp32_lengths(fa, device, B, H, T, causal):
    _check(fa, *_qkv(B, H, T, T, 64, torch.float32, device), causal)


@pytest.mark.parametrize("D", [32, 80, 128])
def test_attention_head_dims(fa, device, D):
    # D = 80 pads to 128 with masked loads
    _check(fa, *_qkv(1, 2, 33, 33, D, torch.float32, device), True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,H,T", [(True, 2, 17), (True, 1, 129), (False, 2, 40)])
def test_attention_low_precision(fa, device, dtype, causal, H, T):
    _check(fa, *_qkv(1, H, T, T, 64, dtype, device), causal)


@pytest.mark.parametrize("causal,Tq,Tk", [(False, 5, 70), (False, 70, 5), (True, 5, 70), (True, 40, 97)])
def test_attention_tq_ne_tk(fa, device, causal, Tq, Tk):
    # causal with Tq < Tk is aligned bottom-right: the last query sees every key
    _check(fa, *_qkv(1, 2, Tq, Tk, 64, torch.float32, device), causal)


def test_attention_causal_query_without_keys(fa, device):
    # causal, Tq > Tk: the first Tq - Tk queries see nothing; we return zeros (the reference NaN)
    q, k, v = _qkv(1, 1, 9, 4, 32, torch.float32, device)
    o = fa.attention(q, k, v, causal=True)
    assert torch.equal(o[:, :, :5], torch.zeros_like(o[:, :, :5]))
    ref = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(o[:, :, 5:], ref[:, :, 5:], rtol=1e-5, atol=1e-5)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))


def test_attention_custom_scale(fa, device):
    _check(fa, *_qkv(1, 1, 17, 17, 64, torch.float32, device), True, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_strided_views(fa, device, dtype):
    """q, k, v as the model makes them: transposed views of one (B, T, 3C) c_attn output."""
    B, T, H, D = 2, 33, 2, 32
    qkv = torch.randn(B, T, 3 * H * D, device=device).to(dtype).requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    do = torch.randn(B, H, D, T, device=device).to(dtype).transpose(2, 3)  # a strided dO too
    o = fa.attention(q, k, v, causal=True)
    assert o.transpose(1, 2).is_contiguous(), "o should be a (B, H, T, D) view of (B, T, H, D) memory"
    (g,) = torch.autograd.grad(o, qkv, do)
    o_lo = attention_ref(q, k, v, causal=True)
    (g_lo,) = torch.autograd.grad(o_lo, qkv, do)
    qkv_hi = qkv.detach().double().requires_grad_()
    qh, kh, vh = (t.view(B, T, H, D).transpose(1, 2) for t in qkv_hi.split(H * D, dim=2))
    o_hi = attention_ref(qh, kh, vh, causal=True, upcast=True)
    (g_hi,) = torch.autograd.grad(o_hi, qkv_hi, do.double())
    assert_close_to_ref(o, o_hi, o_lo, "o")
    assert_close_to_ref(g, g_hi, g_lo, "dqkv")


def test_attention_fwd_launcher_writes_lse(fa, device):
    B, H, T, D = 1, 2, 37, 64
    q, k, v = (t.detach() for t in _qkv(B, H, T, T, D, torch.float32, device))
    o, lse = fa.attention_fwd(q, k, v, True, 0.0, 1 / 8, None)
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=device).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


# ---- dropout: the reference cannot reproduce Philox bits, so test statistics and consistency

def _dropout_mask(fa, B, H, Tq, Tk, p, seed, device):
    """The keep mask the kernel draws for these sizes and this torch seed: q = 0 makes P uniform
    (1/Tk), v = I (D = Tk) makes o = P * keep / (1 - p), so keep = o * Tk * (1 - p)."""
    q = torch.zeros(B, H, Tq, Tk, device=device)
    k = torch.randn(B, H, Tk, Tk, device=device)
    v = torch.eye(Tk, device=device).expand(B, H, Tk, Tk)
    torch.manual_seed(seed)
    o = fa.attention(q, k, v, causal=False, dropout_p=p)
    keep = o.double() * Tk * (1 - p)
    assert torch.allclose(keep, keep.round(), atol=1e-4), "dropout output is not P * {0, 1/(1-p)}"
    return keep.round()


def test_dropout_keep_fraction(fa, device):
    p, n = 0.3, 4 * 64 * 64
    keep = _dropout_mask(fa, 2, 2, 64, 64, p, seed=1, device=device)
    frac = keep.mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # E[o] = o without dropout: the 1/(1-p) rescale makes the mask unbiased
    assert abs((keep / (1 - p)).mean().item() - 1.0) < 5 * sigma / (1 - p)
    # the same torch seed gives the same mask, another seed another one
    assert torch.equal(keep, _dropout_mask(fa, 2, 2, 64, 64, p, seed=1, device=device))
    assert not torch.equal(keep, _dropout_mask(fa, 2, 2, 64, 64, p, seed=2, device=device))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_backward_use_one_mask(fa, device, causal):
    """With a fixed seed the mask depends only on (b, h, i, j): read it off, then check o and
    dq, dk, dv against fp64 autograd of softmax(qk^T) * keep / (1 - p) @ v."""
    B, H, T, p, seed = 1, 2, 32, 0.25, 7
    keep = _dropout_mask(fa, B, H, T, T, p, seed, device)
    q, k, v = _qkv(B, H, T, T, T, torch.float32, device)
    torch.manual_seed(seed)
    o = fa.attention(q, k, v, causal=causal, dropout_p=p)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = hi[0] @ hi[1].transpose(-1, -2) / math.sqrt(T)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=device).triu(1), float("-inf"))
    o_hi = (torch.softmax(s, -1) * keep / (1 - p)) @ hi[2]
    g_hi = torch.autograd.grad(o_hi, hi, do.double())
    torch.testing.assert_close(o.double(), o_hi, rtol=1e-4, atol=1e-5)
    for name, g, gh in zip(("dq", "dk", "dv"), grads, g_hi):
        torch.testing.assert_close(g.double(), gh, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---- registration, validation, long sequences

def test_attention_opcheck(fa, device):
    q, k, v = (t.detach() for t in _qkv(1, 2, 17, 17, 32, torch.float32, device))
    torch.library.opcheck(torch.ops.gpt2_fast_triton.attention_fwd, (q, k, v, True, 0.0, 0.2, None),
                          test_utils=("test_schema", "test_faketensor"))
    o, lse = fa.attention_fwd(q, k, v, True, 0.0, 0.2, None)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.gpt2_fast_triton.attention_bwd,
                          (do, q, k, v, o, lse, True, 0.0, 0.2, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [pytest.param("aot_eager", marks=SLOW_ON_CPU)])
def test_attention_torch_compile_fullgraph(fa, device, backend):
    # Dynamo traces the autograd.Function and both custom ops (fake shapes) without a graph break.
    # ~10 s of tracing on CPU: slow-marked there, unmarked on CUDA.
    q, k, v = (t.detach() for t in _qkv(1, 2, 17, 17, 32, torch.float32, device))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    f = torch.compile(lambda a, b, c: fa.attention(a, b, c, causal=True).sum(), backend=backend,
                      fullgraph=True)
    f(qg, kg, vg).backward()
    ref = attention_ref(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal=True)
    ref.sum().backward()
    torch.testing.assert_close(qg.grad, q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vg.grad, v.grad, rtol=1e-4, atol=1e-5)


def test_attention_rejects_bad_inputs(fa, device):
    q, k, v = (t.detach() for t in _qkv(1, 2, 8, 8, 32, torch.float32, device))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fa.attention(q.long(), k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        fa.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        fa.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"shape \(B, H, Tk, D\)"):
        fa.attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fa.attention(q, k, v.tolist())


@pytest.mark.parametrize("T", [pytest.param(1023, marks=SLOW_ON_CPU)])
def test_attention_t1023(fa, device, T):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H = (2, 4) if device.type == "cuda" else (1, 1)
    _check(fa, *_qkv(B, H, T, T, 64, dtype, device), True)


# ---- the A/B sides (gpt2_fast/choices.py): backward "attention_bwd", forward "attention_fwd_kernel"
# Every test above runs the defaults (triton_det, v1); these run the other sides on the same cases.

@pytest.fixture(params=["triton_atomic", "sdpa"])
def bwd_variant(request, fa, monkeypatch):
    """The custom op reads fa.BWD_VARIANT (resolved once at import) on each call."""
    monkeypatch.setattr(fa, "BWD_VARIANT", request.param)
    return request.param


@pytest.fixture
def fwd_pipelined(fa, monkeypatch):
    monkeypatch.setattr(fa, "FWD_KERNEL", "pipelined")
    return fa


def test_choices_resolved_at_import(fa):
    from gpt2_fast.choices import choice
    assert fa.BWD_VARIANT == choice("attention_bwd") and fa.FWD_KERNEL == choice("attention_fwd_kernel")


# (dtype, causal, B, H, Tq, Tk, D): one query, odd T, several blocks with ragged tails, Tq != Tk,
# D = 80 (padded to 128)
_VARIANT_CASES = [(torch.float32, True, 2, 2, 1, 1, 64), (torch.float32, True, 1, 1, 129, 129, 64),
                  (torch.float32, False, 1, 2, 70, 5, 64), (torch.float32, True, 1, 2, 40, 97, 32),
                  (torch.float16, True, 1, 2, 17, 17, 64), (torch.bfloat16, False, 1, 2, 33, 33, 64),
                  (torch.bfloat16, True, 1, 1, 45, 45, 80)]


@pytest.mark.parametrize("variant,case", [("triton_atomic", c) for c in _VARIANT_CASES]
                         + [("sdpa", _VARIANT_CASES[i]) for i in (0, 2, 3, 4)])  # sdpa: torch's own kernel
def test_bwd_variants(fa, device, monkeypatch, variant, case):
    monkeypatch.setattr(fa, "BWD_VARIANT", variant)  # the custom op reads it on each call
    dtype, causal, B, H, Tq, Tk, D = case
    _check(fa, *_qkv(B, H, Tq, Tk, D, dtype, device), causal)


@pytest.mark.parametrize("dtype,causal,B,H,Tq,Tk,D", [_VARIANT_CASES[i] for i in (0, 1, 2, 3)]
                         + [(torch.bfloat16, False, 1, 1, 100, 100, 64)])
def test_fwd_pipelined(fwd_pipelined, device, dtype, causal, B, H, Tq, Tk, D):
    # T = 100 / 129: the rotated loop runs one / two iterations (interpreter BLOCK_N = 32)
    _check(fwd_pipelined, *_qkv(B, H, Tq, Tk, D, dtype, device), causal)


def test_bwd_variants_query_without_keys(fa, device, bwd_variant):
    # causal, Tq > Tk: the first queries see no key; sdpa hands this case to triton_det
    q, k, v = _qkv(1, 1, 9, 4, 32, torch.float32, device)
    o = fa.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))
    o_hi = attention_ref(*(t.detach().double()[:, :, -4:] if t is q else t.detach().double() for t in (q, k, v)),
                         causal=True, upcast=True)
    torch.testing.assert_close(o[:, :, 5:].double(), o_hi, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["triton_atomic", "sdpa"])
def test_bwd_variants_dropout(fa, device, monkeypatch, variant):
    """The same checks as test_dropout_forward_backward_use_one_mask, causal, for the other sides:
    the atomic kernel regenerates the Philox mask; sdpa cannot and falls back to triton_det."""
    monkeypatch.setattr(fa, "BWD_VARIANT", variant)
    test_dropout_forward_backward_use_one_mask(fa, device, True)


@pytest.mark.parametrize("causal,Tq,Tk", [(True, 9, 4), (True, 4, 9), (False, 3, 200)])
def test_fwd_pipelined_equals_v1(fa, device, causal, Tq, Tk):
    # queries without keys (o = 0, lse = -inf), Tq < Tk, one query over many key blocks
    q, k, v = (t.detach() for t in _qkv(1, 2, Tq, Tk, 32, torch.float32, device))
    o1, l1 = fa.attention_fwd(q, k, v, causal, 0.0, 0.2, None, kernel="v1")
    o2, l2 = fa.attention_fwd(q, k, v, causal, 0.0, 0.2, None, kernel="pipelined")
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)


def test_fwd_pipelined_dropout_same_mask(fa, device):
    q, k, v = (t.detach() for t in _qkv(1, 1, 70, 70, 32, torch.float32, device))
    seed = torch.tensor([123], dtype=torch.int64, device=device)
    o1, l1 = fa.attention_fwd(q, k, v, True, 0.3, 0.2, seed, kernel="v1")
    o2, l2 = fa.attention_fwd(q, k, v, True, 0.3, 0.2, seed, kernel="pipelined")
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)


def test_bwd_atomic_strided_views(fa, device, monkeypatch):
    monkeypatch.setattr(fa, "BWD_VARIANT", "triton_atomic")
    test_attention_strided_views(fa, device, torch.float32)


def test_variant_names_checked(fa, device):
    q, k, v = (t.detach() for t in _qkv(1, 1, 8, 8, 32, torch.float32, device))
    o, lse = fa.attention_fwd(q, k, v, True, 0.0, 0.2, None)
    with pytest.raises(ValueError, match="variant must be"):
        fa.attention_bwd(o, q, k, v, o, lse, True, 0.0, 0.2, None, variant="cudnn")
    with pytest.raises(ValueError, match="kernel must be"):
        fa.attention_fwd(q, k, v, True, 0.0, 0.2, None, kernel="v2")


# ---- shared memory: every config must fit sm_90's 227 KB at the head dim it launches with

def test_fixed_configs_fit_every_head_dim(fa):
    """GPT2_FAST_TRITON_AUTOTUNE=0 launches the first fixed config that fits (D = 256 included);
    at D <= 128 that is the config used before the shared-memory pruner existed."""
    from gpt2_fast.kernels import flash_attention_bwd_atomic as at
    from gpt2_fast.kernels import flash_attention_fwd_pipelined as pf
    from gpt2_fast.kernels.flash_attention_smem import SMEM_LIMIT, smem_estimate
    for family, fixed in (("fwd", fa._FWD_FIXED), ("fwd_pipelined", pf.FIXED), ("bwd_dkdv", fa._DKDV_FIXED),
                          ("bwd_dq", fa._DQ_FIXED), ("bwd_atomic", at.FIXED)):
        for BD in (16, 32, 64, 128, 256):
            for esize in (2, 4):
                sizes = [smem_estimate(family, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], BD, c.num_stages, esize)
                         for c in fixed]
                assert min(sizes) <= SMEM_LIMIT, f"{family}: no fixed config fits D={BD}, {esize}-byte elements"
                if BD <= 128 and esize == 2:
                    assert sizes[0] <= SMEM_LIMIT, f"{family}: the first fixed config should serve D={BD}"
    assert smem_estimate("fwd", 128, 64, 256, 3, 2) == 262144  # the old fixed forward config at D=256
    for family, c in (("fwd", fa._FWD_EXACT), ("bwd_dkdv", fa._DKDV_EXACT), ("bwd_dq", fa._DQ_EXACT),
                      ("bwd_atomic", at.EXACT_FP32_CONFIG)):  # exact fp32: one config for every D
        assert smem_estimate(family, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 256, c.num_stages, 4) <= SMEM_LIMIT


def test_smem_pruner(fa):
    from gpt2_fast.kernels.flash_attention_smem import SMEM_LIMIT, _pruner, smem_estimate
    exact = fa._FWD_EXACT
    prune = _pruner("fwd", fa._FWD_FIXED, exact)["early_config_prune"]
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = prune(fa._FWD_CONFIGS, {"Q": q}, BLOCK_D=256, DOT_PREC="tf32")
    assert kept and len(kept) < len(fa._FWD_CONFIGS)
    assert all(smem_estimate("fwd", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 256, c.num_stages, 2) <= SMEM_LIMIT
               for c in kept)
    assert prune(fa._FWD_CONFIGS, {"Q": q}, BLOCK_D=64, DOT_PREC="tf32") == fa._FWD_CONFIGS
    assert prune(fa._FWD_CONFIGS, {"Q": q.float()}, BLOCK_D=64, DOT_PREC="ieee") == [exact]
    # dropout: the configs whose (BLOCK_M, BLOCK_N) tile per thread spilled on sm_90 are skipped
    from gpt2_fast.kernels import flash_attention_bwd_atomic as at
    drop = _pruner("bwd_atomic", at.FIXED, at.EXACT_FP32_CONFIG)["early_config_prune"]
    kept = drop(at.CONFIGS, {"Q": q}, BLOCK_D=64, DOT_PREC="tf32", HAS_DROPOUT=True)
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps for c in kept)
    assert len(drop(at.CONFIGS, {"Q": q}, BLOCK_D=64, DOT_PREC="tf32", HAS_DROPOUT=False)) == len(at.CONFIGS)
    # fp32 (TF32) at D = 256: no autotune candidate fits, the first fixed config that does is used
    (c,) = prune(fa._FWD_CONFIGS[:1], {"Q": q.float()}, BLOCK_D=256, DOT_PREC="tf32")
    assert smem_estimate("fwd", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 256, c.num_stages, 4) <= SMEM_LIMIT


@pytest.mark.slow  # several minutes of compiling on 2 shared cores
def test_sm90_compile_new_kernels_and_fixed_d256():
    """Triton's real compiler for sm_90 (no GPU needed): the atomic backward and the pipelined
    forward at D = 64 without spills, and every fixed config at D = 256 within 227 KB, with the
    pruner's estimate never below what Triton allocates (flash_attention_sm90 exits 1 otherwise)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args in (["--head-dims", "64", "--only", "_attn_"], ["--head-dims", "256", "--fixed-only"]):
        proc = subprocess.run([sys.executable, "-m", "gpt2_fast.kernels.flash_attention_sm90", *args], env=env,
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
            pytest.skip("no ptxas for sm_90 in this triton install")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

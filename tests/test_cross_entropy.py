"""kernels/cross_entropy.py vs gpt2_fast/reference.py: softmax CE and the chunked LM-head CE."""
import os

import pytest
import torch

from gpt2_fast.reference import lm_head_cross_entropy_ref, softmax_cross_entropy_ref
from tolerance import assert_close_to_ref, assert_close_triton as assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def ce(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")
    from gpt2_fast.kernels import cross_entropy as mod
    return mod


def _targets(N, V, device, ignore_index=-100, n_ignored=1):
    t = torch.randint(0, V, (N,), device=device)
    if N > 1:
        t[torch.randperm(N, device=device)[:n_ignored]] = ignore_index
    return t


# (N, V): one row, one class, odd vocab, several BLOCK_V blocks per row (BLOCK_V = 4096)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 1), (1, 7), (7, 300), (129, 50), (3, 9000)])
def test_softmax_cross_entropy(ce, device, N, V, dtype):
    logits = (4 * torch.randn(N, V, device=device)).to(dtype).requires_grad_()
    t = _targets(N, V, device, n_ignored=2)
    loss = ce.softmax_cross_entropy(logits, t, -100)
    loss_lo = softmax_cross_entropy_ref(logits, t, -100)
    lh = logits.detach().double().requires_grad_()
    loss_hi = softmax_cross_entropy_ref(lh, t, -100, upcast=True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    if torch.isnan(loss_hi):  # every row ignored: torch's mean over no rows
        assert torch.isnan(loss)
        return
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    up = torch.rand((), device=device) + 0.5  # a non-unit upstream gradient
    (g,) = torch.autograd.grad(loss, logits, up)
    (g_lo,) = torch.autograd.grad(loss_lo, logits, up)
    (g_hi,) = torch.autograd.grad(loss_hi, lh, up.double())
    assert g.dtype == dtype
    assert_close(g, g_hi, g_lo, "dlogits")
    assert torch.all(g[t == -100] == 0), "ignored rows must get zero gradient"


def test_custom_ignore_index_and_logits_untouched(ce, device):
    logits = torch.randn(9, 40, device=device, requires_grad=True)
    before = logits.detach().clone()
    t = _targets(9, 40, device, ignore_index=3, n_ignored=3)
    loss = ce.softmax_cross_entropy(logits, t, 3)
    loss.backward()
    assert torch.equal(logits.detach(), before), "the caller's logits must not be overwritten"
    torch.testing.assert_close(loss, softmax_cross_entropy_ref(logits, t, 3))
    ref_g = torch.autograd.grad(softmax_cross_entropy_ref(logits, t, 3), logits)[0]
    torch.testing.assert_close(logits.grad, ref_g)


def test_all_rows_ignored_is_nan_like_torch(ce, device):
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    assert torch.isnan(ce.softmax_cross_entropy(logits, t)) and torch.isnan(softmax_cross_entropy_ref(logits, t))
    h = torch.randn(4, 8, device=device)
    assert torch.isnan(ce.lm_head_cross_entropy(h, torch.randn(10, 8, device=device), t))


# (N, C, V_padded, V): padded vocab, one row, chunking that leaves a ragged last chunk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,Vp,V,chunk", [(1, 16, 40, 33, 0), (7, 64, 310, 300, 0),
                                             (129, 32, 257, 257, 50), (17, 24, 64, 50, 1)])
def test_lm_head_cross_entropy(ce, device, N, C, Vp, V, chunk, dtype):
    h = torch.randn(N, C, device=device).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(Vp, C, device=device)).to(dtype).requires_grad_()
    t = _targets(N, V, device, n_ignored=2)
    loss = ce.lm_head_cross_entropy(h, w, t, -100, V, chunk_rows=chunk)
    loss_lo = lm_head_cross_entropy_ref(h, w, t, -100, V)
    hh, wh = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss_hi = lm_head_cross_entropy_ref(hh, wh, t, -100, V, upcast=True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    up = torch.rand((), device=device) + 0.5
    dh, dw = torch.autograd.grad(loss, [h, w], up)
    dh_lo, dw_lo = torch.autograd.grad(loss_lo, [h, w], up)
    dh_hi, dw_hi = torch.autograd.grad(loss_hi, [hh, wh], up.double())
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close(dh, dh_hi, dh_lo, "dhidden")
    assert_close(dw, dw_hi, dw_lo, "dweight")
    assert torch.all(dw[V:] == 0), "padded vocabulary rows must get zero gradient"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_lm_head_mixed_dtypes(ce, device, low):
    """16-bit hidden with the fp32 tied embedding, no autocast: the matmuls run in fp32 (the wider
    dtype, reference.matmul_dtype), gradients in each input's dtype. Under autocast (the matmuls
    in the autocast dtype): tests/test_autocast.py."""
    h = torch.randn(21, 24, device=device).to(low).requires_grad_()
    w = (0.3 * torch.randn(50, 24, device=device)).requires_grad_()
    t = _targets(21, 47, device, n_ignored=2)
    loss = ce.lm_head_cross_entropy(h, w, t, -100, 47, chunk_rows=8)
    loss_lo = lm_head_cross_entropy_ref(h, w, t, -100, 47)
    hh, wh = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss_hi = lm_head_cross_entropy_ref(hh, wh, t, -100, 47, upcast=True)
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    dh, dw = torch.autograd.grad(loss, [h, w])
    dh_lo, dw_lo = torch.autograd.grad(loss_lo, [h, w])
    dh_hi, dw_hi = torch.autograd.grad(loss_hi, [hh, wh])
    assert dh.dtype == low and dw.dtype == torch.float32
    assert_close(dh, dh_hi, dh_lo, "dhidden")
    assert_close(dw, dw_hi, dw_lo, "dweight")


@pytest.mark.parametrize("which", ["hidden", "weight", "none"])
def test_lm_head_partial_grads(ce, device, which):
    h = torch.randn(6, 16, device=device, requires_grad=which == "hidden")
    w = torch.randn(20, 16, device=device, requires_grad=which == "weight")
    t = _targets(6, 20, device)
    loss = ce.lm_head_cross_entropy(h, w, t)
    ref = lm_head_cross_entropy_ref(h, w, t)
    torch.testing.assert_close(loss, ref)
    if which != "none":
        leaf = h if which == "hidden" else w
        torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, leaf)[0])


def test_lm_head_under_no_grad(ce, device, monkeypatch):
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(20, 16, device=device, requires_grad=True)
    t = _targets(6, 20, device)
    seen = []
    real = torch.ops.gpt2_fast_triton.lm_head_cross_entropy_fwd

    class Spy:  # records the need_dhidden / need_dweight flags the op was called with
        def __call__(self, *a):
            seen.append(a[6:8])
            return real(*a)
    monkeypatch.setattr(ce.torch.ops.gpt2_fast_triton, "lm_head_cross_entropy_fwd", Spy(), raising=False)
    with torch.no_grad():
        loss = ce.lm_head_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, lm_head_cross_entropy_ref(h, w, t))
    assert seen == [(False, False)], "no gradient work under torch.no_grad()"


def test_chunk_size_from_memory(ce):
    # GPT-2 training step: 16384 rows, 50257 classes, bf16 -> chunks of CHUNK_BYTES logits
    rows = ce._chunk_rows(16384, 50257, 2)
    assert rows % 64 == 0 and rows * 50257 * 2 <= ce.CHUNK_BYTES
    assert 16384 * 50257 * 2 / (rows * 50257 * 2) >= 4, "a chunk must be well under the full logits"
    assert ce._chunk_rows(3, 50257, 4) == 3


def test_bad_inputs(ce, device):
    logits = torch.randn(4, 10, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        ce.softmax_cross_entropy(logits, torch.tensor([0, 1, 10, 3], device=device))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        ce.softmax_cross_entropy(logits, torch.tensor([0, -5, 1, 3], device=device))
    with pytest.raises(TypeError, match="targets must be an int64"):
        ce.softmax_cross_entropy(logits, t.float())
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        ce.softmax_cross_entropy(logits, t[:3])
    with pytest.raises(ValueError, match=r"logits must have shape \(N, V\)"):
        ce.softmax_cross_entropy(logits[None], t)
    h, w = torch.randn(4, 8, device=device), torch.randn(12, 8, device=device)
    with pytest.raises(ValueError, match="vocab_size must be"):
        ce.lm_head_cross_entropy(h, w, t, -100, 13)
    with pytest.raises(ValueError, match="same C"):
        ce.lm_head_cross_entropy(h, w[:, :4], t)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        ce.lm_head_cross_entropy(h, w, torch.tensor([0, 1, 11, 3], device=device), -100, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton ops needs CUDA "
                    "(the interpreter cannot run on fake tensors)")
def test_torch_compile_traces(ce):
    h = torch.randn(256, 128, device="cuda", requires_grad=True)
    w = torch.randn(1000, 128, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (256,), device="cuda")
    f = torch.compile(lambda h, w, t: ce.lm_head_cross_entropy(h, w, t, -100, 1000), fullgraph=True)
    loss = f(h, w, t)
    torch.testing.assert_close(loss, lm_head_cross_entropy_ref(h, w, t), atol=1e-4, rtol=1e-4)
    loss.backward()
    g = torch.compile(lambda x, t: ce.softmax_cross_entropy(x, t), fullgraph=True)
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    torch.testing.assert_close(g(x, t[:64]), softmax_cross_entropy_ref(x, t[:64]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,V,Vp,chunk", [(1, 8, 1, 16, 0), (3, 40, 257, 320, 2), (37, 64, 100, 128, 16),
                                             (5, 24, 300, 300, 2)])
def test_lm_head_padded_vocab_masked(ce, device, monkeypatch, N, C, V, Vp, chunk, dtype):
    """The GEMMs run over all Vp rows (aligned row stride of the logits chunk); the padded rows'
    logits (made huge here, so any leak into the softmax shows) are -inf inside the CE kernel:
    the loss equals the one over weight[:V] and the padded rows get exactly zero gradient."""
    seen = []
    real = ce.launch

    def spy(kernel):
        run = real(kernel)

        def grid(g):
            def call(*args, **kw):
                seen.append((args[0].shape, args[0].stride(0), args[7], args[8]))  # logits, V, V_ROW
                return run[g](*args, **kw)
            return call
        return type("Spy", (), {"__getitem__": lambda self, g: grid(g)})()
    monkeypatch.setattr(ce, "launch", spy)
    h = torch.randn(N, C, device=device).to(dtype).requires_grad_()
    w = 0.3 * torch.randn(Vp, C, device=device)
    w[V:] = 50.0 * h.detach().float().mean(0).sign()       # padded rows: logits >> the real ones
    w = w.to(dtype).requires_grad_()
    t = _targets(N, V, device, n_ignored=0)
    loss = ce.lm_head_cross_entropy(h, w, t, -100, V, chunk_rows=chunk)
    Val = -(-Vp // 64) * 64                                  # rows padded to 64 when they are not
    assert seen and all(shape[1] == Val and stride == Val and v == V and v_row == Val
                        for shape, stride, v, v_row in seen), seen
    loss_lo = lm_head_cross_entropy_ref(h, w, t, -100, V)
    hh, wh = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss_hi = lm_head_cross_entropy_ref(hh, wh, t, -100, V, upcast=True)
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    dh, dw = torch.autograd.grad(loss, [h, w])
    dh_lo, dw_lo = torch.autograd.grad(loss_lo, [h, w])
    dh_hi, dw_hi = torch.autograd.grad(loss_hi, [hh, wh])
    assert_close(dh, dh_hi, dh_lo, "dhidden")
    assert_close(dw, dw_hi, dw_lo, "dweight")
    assert torch.equal(dw[V:], torch.zeros_like(dw[V:])), "padded rows must get exactly zero gradient"

"""The CPU fused LM head + cross-entropy (csrc/cpu/lm_head_loss.cpp via gpt2_fast.extension)
against the reference, forward and both gradients, fp32 / fp16 / bf16 and under bf16 autocast
(tests/test_autocast.py covers the cpp backend's dtype rules as well)."""
from __future__ import annotations

import pytest
import torch

from gpt2_fast import extension
from gpt2_fast.reference import lm_head_cross_entropy_ref
from tolerance import assert_close_to_ref

pytestmark = pytest.mark.skipif(extension.unavailable_reason("cpu") is not None,
                                reason=f"extension: {extension.unavailable_reason('cpu')}")
ce = extension.lm_head_cross_entropy


def _targets(N, V, n_ignored):
    t = torch.randint(0, V, (N,))
    t[torch.randperm(N)[:n_ignored]] = -100
    return t


def _grads(loss, leaves, up):
    return torch.autograd.grad(loss, leaves, up)


# (N, C, V_padded, V): one row; odd sizes; one row with many vocabulary blocks (vb = 4096 at N=1);
# > 1024 rows (two row chunks: dW sums over chunks); more blocks than threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C,Vp,V", [(1, 16, 40, 33), (1, 24, 9000, 8999), (7, 37, 310, 300),
                                       (1100, 32, 700, 613), (300, 64, 5000, 5000)])
def test_matches_reference(N, C, Vp, V, dtype):
    torch.manual_seed(N + V)
    h = torch.randn(N, C).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(Vp, C)).to(dtype).requires_grad_()
    t = _targets(N, V, n_ignored=min(2, N - 1))
    loss, loss_lo = ce(h, w, t, -100, V), lm_head_cross_entropy_ref(h, w, t, -100, V)
    hh, wh = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss_hi = lm_head_cross_entropy_ref(hh, wh, t, -100, V, upcast=True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    up = torch.rand(()) + 0.5
    dh, dw = _grads(loss, [h, w], up)
    dh_lo, dw_lo = _grads(loss_lo, [h, w], up)
    dh_hi, dw_hi = _grads(loss_hi, [hh, wh], up.double())
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close_to_ref(dh, dh_hi, dh_lo, "dhidden")
    assert_close_to_ref(dw, dw_hi, dw_lo, "dweight")
    assert torch.all(dw[V:] == 0), "padded vocabulary rows must get zero gradient"


def test_bf16_autocast_training_shape():
    """The demo's case: bf16 hidden from autocast, the fp32 tied embedding, 1024 rows, a vocab
    that is not a multiple of the block; gradients land in fp32 for the weight."""
    torch.manual_seed(0)
    h = torch.randn(1024, 64).requires_grad_()
    w = (0.05 * torch.randn(5003, 64)).requires_grad_()
    t = _targets(1024, 5003, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, loss_lo = ce(h, w, t, -100, 5003), lm_head_cross_entropy_ref(h, w, t, -100, 5003)
    hh, wh = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss_hi = lm_head_cross_entropy_ref(hh, wh, t, -100, 5003, upcast=True)
    assert_close_to_ref(loss, loss_hi, loss_lo, "loss")
    dh, dw = _grads(loss, [h, w], torch.tensor(1.0))
    dh_lo, dw_lo = _grads(loss_lo, [h, w], torch.tensor(1.0))
    dh_hi, dw_hi = _grads(loss_hi, [hh, wh], torch.tensor(1.0, dtype=torch.float64))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    # dh sums one bf16-rounded partial per vocabulary block (the reference rounds once): 2x + 1 ulp
    assert_close_to_ref(dh, dh_hi, dh_lo, "dhidden", atol=dh_hi.abs().max().item() * 2 ** -8)
    assert_close_to_ref(dw, dw_hi, dw_lo, "dweight")


def test_thread_count_does_not_change_the_loss():
    torch.manual_seed(1)
    h, w, t = torch.randn(64, 32), 0.3 * torch.randn(3000, 32), torch.randint(0, 3000, (64,))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ce(h, w, t)
        torch.set_num_threads(max(2, n))
        many = ce(h, w, t)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)


def test_no_gradient_work_without_grad(monkeypatch):
    """Leaves that require grad, under torch.no_grad() (evaluation): the op skips its gradient pass."""
    h, w, t = torch.randn(6, 16, requires_grad=True), torch.randn(20, 16, requires_grad=True), torch.randint(0, 20, (6,))
    seen, real = [], torch.ops.gpt2_fast.lm_head_ce_fwd

    def spy(*a):
        seen.append(a[5])
        return real(*a)
    monkeypatch.setattr(torch.ops.gpt2_fast, "lm_head_ce_fwd", spy, raising=False)
    with torch.no_grad():
        torch.testing.assert_close(ce(h, w, t), lm_head_cross_entropy_ref(h, w, t))
    ce(h, w, t).backward()
    assert seen == [False, True]
    monkeypatch.undo()
    _, dh, dw = torch.ops.gpt2_fast.lm_head_ce_fwd(h.detach(), w.detach(), t, -100, 20, False)
    assert dh.numel() == 0 and dw.numel() == 0


def test_all_rows_ignored_is_nan_like_torch():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    t = torch.full((4,), -100)
    loss = ce(h, w, t)
    assert torch.isnan(loss) and torch.isnan(lm_head_cross_entropy_ref(h, w, t))


@pytest.mark.parametrize("bad", ["target", "vocab", "shape"])
def test_bad_input_says_what_was_expected(bad):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    if bad == "target":
        t[1] = 10
        with pytest.raises(RuntimeError, match=r"outside \[0, 10\)"):
            ce(h, w, t)
    elif bad == "vocab":
        with pytest.raises(ValueError, match="vocab_size"):
            ce(h, w, t, -100, 11)
    else:
        with pytest.raises(ValueError, match=r"hidden \(N, C\)"):
            ce(h, torch.randn(10, 9), t)

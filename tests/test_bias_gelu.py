"""kernels/bias_gelu.py vs gpt2_fast/reference.py::bias_gelu_ref, forward, dx and dbias."""
import os

import pytest
import torch

from gpt2_fast.reference import bias_gelu_ref
from tolerance import assert_close_triton as assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 7), (7, 257), (3, 5, 64), (129, 48), (2, 3072), (1, 1, 1600)]


@pytest.fixture
def bg(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")
    from gpt2_fast.kernels import bias_gelu as mod
    return mod


def _hi(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's sigmoid tails
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_fwd_bwd(bg, device, shape, dtype):
    N = shape[-1]
    x = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    b = torch.randn(N, device=device).to(dtype).requires_grad_()
    y = bg.bias_gelu(x, b)
    assert y.shape == x.shape and y.dtype == dtype
    y_lo = bias_gelu_ref(x, b)
    xh, bh = _hi(x), _hi(b)
    y_hi = bias_gelu_ref(xh, bh, upcast=True)
    assert_close(y, y_hi, y_lo, "y")
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, [x, b], dy)
    dx_lo, db_lo = torch.autograd.grad(y_lo, [x, b], dy)
    dx_hi, db_hi = torch.autograd.grad(y_hi, [xh, bh], dy.double())
    assert_close(dx, dx_hi, dx_lo, "dx")
    assert_close(db, db_hi, db_lo, "dbias")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_no_bias(bg, device):
    x = (4 * torch.randn(9, 130, device=device)).requires_grad_()
    y = bg.bias_gelu(x, None)
    y_hi = bias_gelu_ref(_hi(x), None, upcast=True)
    assert_close(y, y_hi, bias_gelu_ref(x, None), "y")
    dx = torch.autograd.grad(y.sum(), x)[0]
    dx_lo = torch.autograd.grad(bias_gelu_ref(x, None).sum(), x)[0]
    xh = _hi(x)
    dx_hi = torch.autograd.grad(bias_gelu_ref(xh, None, upcast=True).sum(), xh)[0]
    assert_close(dx, dx_hi, dx_lo, "dx")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_tails_are_exact(bg, device):
    x = torch.tensor([[-1e4, -50.0, -10.0, 0.0, 10.0, 50.0, 1e4]], device=device)
    y = bg.bias_gelu(x, None)
    assert torch.equal(y[0, 0:2], torch.zeros(2, device=device).neg()) or torch.all(y[0, 0:2] == 0)
    torch.testing.assert_close(y, bias_gelu_ref(x, None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_bias_with_16bit_x(bg, device, dtype):
    """c_fc's output under autocast (16-bit) with its fp32 bias: y and dx in x's dtype, dbias fp32
    (summed in fp32). tests/test_autocast.py runs the same under torch.autocast on every backend."""
    x = (3 * torch.randn(6, 5, 72, device=device)).to(dtype).requires_grad_()
    b = torch.randn(72, device=device, requires_grad=True)
    y = bg.bias_gelu(x, b)
    y_lo = bias_gelu_ref(x, b)
    xh, bh = _hi(x), _hi(b)
    y_hi = bias_gelu_ref(xh, bh, upcast=True)
    assert y.dtype == y_lo.dtype == dtype
    assert_close(y, y_hi, y_lo, "y")
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, [x, b], dy)
    dx_lo, db_lo = torch.autograd.grad(y_lo, [x, b], dy)
    dx_hi, db_hi = torch.autograd.grad(y_hi, [xh, bh], dy.double())
    assert dx.dtype == dtype and db.dtype == torch.float32
    assert_close(dx, dx_hi, dx_lo, "dx")
    assert_close(db, db_hi, db_lo, "dbias")


def test_frozen_bias_gets_no_grad(bg, device):
    x = torch.randn(4, 40, device=device, requires_grad=True)
    b = torch.randn(40, device=device)  # requires_grad False
    y = bg.bias_gelu(x, b)
    (dx,) = torch.autograd.grad(y.sum(), [x])
    assert not torch.isnan(dx).any()


def test_bad_inputs(bg, device):
    x = torch.randn(3, 16, device=device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bg.bias_gelu(x.to(torch.int32), None)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        bg.bias_gelu(x, torch.randn(15, device=device))
    with pytest.raises(TypeError, match="bias must be float32"):
        bg.bias_gelu(x, torch.arange(16, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton ops needs CUDA "
                    "(the interpreter cannot run on fake tensors)")
def test_torch_compile_traces(bg):
    x = torch.randn(64, 3072, device="cuda", requires_grad=True)
    b = torch.randn(3072, device="cuda", requires_grad=True)
    f = torch.compile(lambda x, b: bg.bias_gelu(x, b).sum(), fullgraph=True)
    out = f(x, b)
    torch.testing.assert_close(out, bias_gelu_ref(x, b).sum(), atol=1e-2, rtol=1e-4)
    out.backward()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("shape", [(40, 1100), (257, 96)])
def test_backward_is_two_launches_and_walks_many_tiles(bg, device, monkeypatch, shape):
    """The persistent backward (several row tiles per program under the interpreter's 4 programs)
    plus ONE launch that sums and casts the dbias partials; dbias checked against the reference."""
    from gpt2_fast.kernels import _reduce
    counts = {}
    for m in (bg, _reduce):
        def counting(kernel, real=m.launch):
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
            counts[name] = counts.get(name, 0) + 1
            return real(kernel)
        monkeypatch.setattr(m, "launch", counting)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(shape[-1], device=device, requires_grad=True)                # fp32 bias (autocast mix)
    y = bg.bias_gelu(x, b)
    counts.clear()
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, [x, b], dy)
    assert sum(counts.values()) == 2 and {k.split(".")[-1] for k in counts} == {
        "_bias_gelu_bwd_kernel", "_sum_partials_kernel"}, counts
    xh, bh = _hi(x), _hi(b)
    dx_hi, db_hi = torch.autograd.grad(bias_gelu_ref(xh, bh, upcast=True), [xh, bh], dy.double())
    dx_lo, db_lo = torch.autograd.grad(bias_gelu_ref(x, b), [x, b], dy)
    assert db.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert_close(dx, dx_hi, dx_lo, "dx")
    assert_close(db, db_hi, db_lo, "dbias")

"""kernels/layer_norm.py (layer_norm, add_layer_norm) vs gpt2_fast/reference.py, forward and grads."""
import os

import pytest
import torch

from gpt2_fast import poison
from gpt2_fast.reference import add_layer_norm_ref, layer_norm_ref
from tolerance import assert_close_triton as assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape of x): one row, odd widths, several rows per program, GPT-2 widths, the widest
SHAPES = [(1, 1), (1, 8), (7, 257), (3, 7, 33), (129, 64), (2, 768), (2, 1600)]


def _skip_unless_triton(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")


@pytest.fixture
def ln(device):
    _skip_unless_triton(device)
    from gpt2_fast.kernels import layer_norm as mod
    return mod


def _params(C, dtype, device, weight=True, bias=True):
    w = (1 + 0.5 * torch.randn(C, device=device)).to(dtype).requires_grad_() if weight else None
    b = (0.5 * torch.randn(C, device=device)).to(dtype).requires_grad_() if bias else None
    return w, b


def _leaves(*ts):
    return [t for t in ts if t is not None]


def _hi(t):
    return None if t is None else t.detach().double().requires_grad_()


def _compare(outs, refs_hi, refs_lo, names):
    for o, h, lo, n in zip(outs, refs_hi, refs_lo, names):
        assert_close(o, h, lo, n)


def test_poison_is_on():
    assert poison.ENABLED, "tests/conftest.py must set GPT2_FAST_POISON=1 before gpt2_fast is imported"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fwd_bwd(ln, device, shape, dtype):
    C = shape[-1]
    x = (2 * torch.randn(shape, device=device) + 0.5).to(dtype).requires_grad_()
    w, b = _params(C, dtype, device)
    y = ln.layer_norm(x, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    y_lo = layer_norm_ref(x, w, b, 1e-5)
    xh, wh, bh = _hi(x), _hi(w), _hi(b)
    y_hi = layer_norm_ref(xh, wh, bh, 1e-5, upcast=True)
    assert_close(y, y_hi, y_lo, "y")
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, w, b], dy)
    g_lo = torch.autograd.grad(y_lo, [x, w, b], dy)
    g_hi = torch.autograd.grad(y_hi, [xh, wh, bh], dy.double())
    _compare(g, g_hi, g_lo, ["dx", "dw", "db"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (7, 257), (2, 5, 768), (129, 64), (1, 1600)])
def test_add_layer_norm_fwd_bwd(ln, device, shape, dtype):
    C = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    r = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    w, b = _params(C, dtype, device)
    s, y = ln.add_layer_norm(x, r, w, b, 1e-5)
    s_lo, y_lo = add_layer_norm_ref(x, r, w, b, 1e-5)
    xh, rh, wh, bh = _hi(x), _hi(r), _hi(w), _hi(b)
    s_hi, y_hi = add_layer_norm_ref(xh, rh, wh, bh, 1e-5, upcast=True)
    assert_close(s, s_hi, s_lo, "s")
    assert torch.equal(s, s_lo), "s = x + residual must round exactly as torch's add"
    assert_close(y, y_hi, y_lo, "y")
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    g = torch.autograd.grad([s, y], [x, r, w, b], [ds, dy])
    g_lo = torch.autograd.grad([s_lo, y_lo], [x, r, w, b], [ds, dy])
    g_hi = torch.autograd.grad([s_hi, y_hi], [xh, rh, wh, bh], [ds.double(), dy.double()])
    _compare(g, g_hi, g_lo, ["dx", "dresidual", "dw", "db"])


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_bias(ln, device, weight, bias):
    x = torch.randn(5, 96, device=device, requires_grad=True)
    r = torch.randn(5, 96, device=device, requires_grad=True)
    w, b = _params(96, torch.float32, device, weight, bias)
    s, y = ln.add_layer_norm(x, r, w, b, 1e-5)
    s_lo, y_lo = add_layer_norm_ref(x, r, w, b, 1e-5)
    leaves = _leaves(x, r, w, b)
    hi = [_hi(t) for t in (x, r, w, b)]
    s_hi, y_hi = add_layer_norm_ref(*hi, 1e-5, upcast=True)
    assert_close(y, y_hi, y_lo, "y")
    dy = torch.randn_like(y)
    g = torch.autograd.grad((y * dy).sum() + s.sum(), leaves)
    g_lo = torch.autograd.grad((y_lo * dy).sum() + s_lo.sum(), leaves)
    g_hi = torch.autograd.grad((y_hi * dy.double()).sum() + s_hi.sum(), _leaves(*hi))
    _compare(g, g_hi, g_lo, [f"grad{i}" for i in range(len(g))])


def test_fp32_params_with_bf16_activations(ln, device):
    x = torch.randn(9, 200, device=device).to(torch.bfloat16).requires_grad_()
    w, b = _params(200, torch.float32, device)
    y = ln.layer_norm(x, w, b, 1e-5)
    y_lo = layer_norm_ref(x, w, b, 1e-5)
    y_hi = layer_norm_ref(_hi(x), _hi(w), _hi(b), 1e-5, upcast=True)
    assert y.dtype == torch.bfloat16
    assert_close(y, y_hi, y_lo, "y")
    gw, gb = torch.autograd.grad(y.float().sum(), [w, b])
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["stream_first", "branch_first"])
def test_add_layer_norm_mixed_dtypes(ln, device, low, order):
    """An fp32 residual stream plus a 16-bit branch, no autocast: s and y in fp32 (the wider
    dtype; s rounded as torch's add), each gradient in its own input's dtype. Under autocast
    (y in the autocast dtype): tests/test_autocast.py."""
    stream = (3 * torch.randn(5, 7, 96, device=device)).requires_grad_()
    branch = torch.randn(5, 7, 96, device=device).to(low).requires_grad_()
    x, r = (stream, branch) if order == "stream_first" else (branch, stream)
    w, b = _params(96, torch.float32, device)
    s, y = ln.add_layer_norm(x, r, w, b, 1e-5)
    s_lo, y_lo = add_layer_norm_ref(x, r, w, b, 1e-5)
    hi = [_hi(t) for t in (x, r, w, b)]
    s_hi, y_hi = add_layer_norm_ref(*hi, 1e-5, upcast=True)
    assert s.dtype == y.dtype == y_lo.dtype == torch.float32
    assert torch.equal(s, s_lo), "s = x + residual must round exactly as torch's add"
    assert_close(y, y_hi, y_lo, "y")
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    g = torch.autograd.grad([s, y], [x, r, w, b], [ds, dy])
    g_lo = torch.autograd.grad([s_lo, y_lo], [x, r, w, b], [ds, dy])
    g_hi = torch.autograd.grad([s_hi, y_hi], hi, [ds.double(), dy.double()])
    assert [t.dtype for t in g] == [x.dtype, r.dtype, torch.float32, torch.float32]
    _compare(g, g_hi, g_lo, ["dx", "dresidual", "dw", "db"])


def test_widest_row(ln, device):
    x = torch.randn(2, 8192, device=device, requires_grad=True)
    w, b = _params(8192, torch.float32, device)
    y = ln.layer_norm(x, w, b, 1e-5)
    y_hi = layer_norm_ref(_hi(x), _hi(w), _hi(b), 1e-5, upcast=True)
    assert_close(y, y_hi, layer_norm_ref(x, w, b, 1e-5), "y")
    dx = torch.autograd.grad(y.sum(), x)[0]
    assert not torch.isnan(dx).any()


def test_non_contiguous_input(ln, device):
    base = torch.randn(6, 2 * 48, device=device)
    x = base[:, ::2]  # column stride 2: copied before the launch
    w, b = _params(48, torch.float32, device)
    y = ln.layer_norm(x, w, b, 1e-5)
    assert_close(y, layer_norm_ref(x.double(), w.double(), b.double(), 1e-5, upcast=True),
                        layer_norm_ref(x, w, b, 1e-5), "y")


def test_bad_inputs(ln, device):
    x = torch.randn(3, 16, device=device)
    w, b = _params(16, torch.float32, device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ln.layer_norm(x.long(), w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ln.layer_norm(x, w[:8], b)
    with pytest.raises(ValueError, match="width must be in"):
        ln.layer_norm(torch.randn(1, 8193, device=device), None, None)
    with pytest.raises(ValueError, match="residual must match x's shape"):
        ln.add_layer_norm(x, x[:2], w, b)
    with pytest.raises(ValueError, match="non-negative"):
        ln.layer_norm(x, w, b, -1.0)


def test_registered_ops(ln, device):
    assert hasattr(torch.ops.gpt2_fast_triton, "layer_norm_fwd")
    x = torch.randn(4, 32, device=device)
    y, s, mean, rstd = torch.ops.gpt2_fast_triton.layer_norm_fwd(x, None, None, None, 1e-5, x.dtype)
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (32,)), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton ops needs CUDA "
                    "(the interpreter cannot run on fake tensors)")
def test_torch_compile_traces(ln):
    x = torch.randn(64, 768, device="cuda", requires_grad=True)
    r = torch.randn(64, 768, device="cuda")
    w, b = _params(768, torch.float32, torch.device("cuda"))
    f = torch.compile(lambda x, r: ln.add_layer_norm(x, r, w, b, 1e-5)[1].sum(), fullgraph=True)
    out = f(x, r)
    torch.testing.assert_close(out, add_layer_norm_ref(x, r, w, b, 1e-5)[1].sum(), atol=1e-3, rtol=1e-4)
    out.backward()


# ---- the dW/dB partials summed in one launch (kernels/_reduce.py), persistent-grid sizing ----

# (P, N): one partial of one column, odd widths, P over one 64-row slab; a GPT-2 width in fp32
@pytest.mark.parametrize("P,N,dtype", [(P, N, dt) for P, N in [(1, 1), (3, 257), (70, 40)] for dt in DTYPES]
                         + [(33, 768, torch.float32)])
def test_sum_partials_matches_torch_and_is_deterministic(device, P, N, dtype):
    _skip_unless_triton(device)
    from gpt2_fast.kernels._reduce import sum_partials
    a = torch.randn(P, N, device=device)
    b = torch.randn(P, N, device=device) * 100
    s0, s1 = sum_partials(a, dtype, b, torch.float32)
    assert s0.dtype == dtype and s1.dtype == torch.float32 and s0.shape == s1.shape == (N,)
    torch.testing.assert_close(s0, a.double().sum(0).to(dtype), atol=1e-4 * P, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(s1.double(), b.double().sum(0), atol=1e-3 * P, rtol=1e-5)
    again0, again1 = sum_partials(a, dtype, b, torch.float32)
    assert torch.equal(s0, again0) and torch.equal(s1, again1)          # bit-for-bit
    only, none = sum_partials(b, torch.float32)
    assert none is None and torch.equal(only, s1)


def _count_launches(monkeypatch, *modules):
    """Patch `launch` in each module to count kernel launches by kernel name."""
    counts = {}
    for m in modules:
        real = m.launch

        def counting(kernel, real=real):
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
            counts[name] = counts.get(name, 0) + 1
            return real(kernel)
        monkeypatch.setattr(m, "launch", counting)
    return counts


@pytest.mark.parametrize("residual", [False, True])
def test_backward_is_two_launches(ln, device, monkeypatch, residual):
    """The backward kernel plus ONE reduce launch for dw and db together (no torch sums)."""
    from gpt2_fast.kernels import _reduce
    x = torch.randn(37, 96, device=device, requires_grad=True)
    r = torch.randn(37, 96, device=device, requires_grad=True) if residual else None
    w, b = _params(96, torch.float32, device)
    if residual:
        s, y = ln.add_layer_norm(x, r, w, b)
        loss = (y * torch.randn_like(y)).sum() + (s * torch.randn_like(s)).sum()
    else:
        loss = (ln.layer_norm(x, w, b) * torch.randn(37, 96, device=device)).sum()
    counts = _count_launches(monkeypatch, ln, _reduce)
    loss.backward()
    names = {k.split(".")[-1] for k in counts}
    assert sum(counts.values()) == 2 and names == {"_layer_norm_bwd_kernel", "_sum_partials_kernel"}, counts
    assert w.grad is not None and b.grad is not None and x.grad is not None


def test_ctas_per_sm_follows_the_occupancy_rules():
    from gpt2_fast.kernels._occupancy import ctas_per_sm
    assert ctas_per_sm(96, 16408, 8) == 2        # registers: 96*32 per warp -> 21 warps -> 2 CTAs of 8
    assert ctas_per_sm(79, 0, 8) == 3            # 79 -> 80 regs: 25 warps -> 3 CTAs
    assert ctas_per_sm(32, 0, 4) == 16           # threads: 2048 / 128
    assert ctas_per_sm(16, 0, 1) == 32           # the 32-blocks-per-SM cap
    assert ctas_per_sm(40, 100 * 1024, 4) == 2   # shared memory: 228 KB / (100 KB + 1 KB)
    assert ctas_per_sm(255, 0, 16) == 1          # never 0


def test_resident_programs_off_cuda_is_the_fixed_fallback(device):
    from gpt2_fast.kernels._occupancy import resident_programs
    assert resident_programs(object(), (), {}, torch.device("cpu"), cpu=4) == 4


def test_resident_programs_on_cuda_reads_the_compiled_kernel_once(monkeypatch):
    """The CUDA path, with a stand-in kernel and device (no GPU here): regs/smem of the compiled
    kernel -> CTAs per SM x SMs, compiled once per key; while tracing, the cached value or the
    fixed fallback, never a compile."""
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpt2_fast.kernels import _occupancy as occ
    props = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                                  shared_memory_per_multiprocessor=233472,
                                  max_threads_per_multi_processor=2048)
    monkeypatch.setattr(occ, "INTERPRET", False)
    monkeypatch.setattr(occ.torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(occ, "_CACHE", {})
    compiles = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            compiles.append(kwargs)
            md = types.SimpleNamespace(shared=16408, num_warps=kwargs["num_warps"])
            return types.SimpleNamespace(n_regs=96, metadata=md)
    k, cuda = Kernel(), torch.device("cuda", 0)
    x = torch.empty(4, 8)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert occ.resident_programs(k, (fake, 3), {"num_warps": 8, "B": 2}, cuda) == 2 * 132   # fallback
    assert compiles == []
    assert occ.resident_programs(k, (x, 3), {"num_warps": 8, "B": 2}, cuda) == 2 * 132      # 96 regs
    assert occ.resident_programs(k, (x, 5), {"num_warps": 8, "B": 2}, cuda) == 2 * 132
    assert occ.resident_programs(k, (fake, 5), {"num_warps": 8, "B": 2}, cuda) == 2 * 132
    assert len(compiles) == 1
    assert occ.resident_programs(k, (x, 3), {"num_warps": 2, "B": 2}, cuda) == 10 * 132     # 21 warps by regs / 2
    assert len(compiles) == 2

"""gpt2_fast._C (csrc/) against gpt2_fast/reference.py, forward and every gradient.

The CPU kernels run here; the same tests run on CUDA when a GPU and a CUDA build are there
(skipped otherwise, with the reason). Tolerance: tests/tolerance.py (error vs the float64
reference <= 2x torch's own error in the same dtype + atol).
"""
import builtins
import dis
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

from gpt2_fast import ops, reference
from tolerance import assert_close_to_ref

ext = pytest.importorskip("gpt2_fast.extension")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def dev(device):
    why = ext.unavailable_reason(device.type)
    if why:
        pytest.skip(f"extension unusable on {device.type}: {why}")
    return device


def _grads(fn, inputs, gouts):
    """Gradients of sum(out_i * gout_i) w.r.t. the inputs that require grad (None for others)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, gouts))
    want = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = iter(torch.autograd.grad(loss, want))
    return outs, [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def _leaf(t, dtype=None, upcast=False):
    if t is None:
        return None
    t = t.detach().to(torch.float64 if upcast else (dtype or t.dtype))
    return t.requires_grad_()


def _check_op(kernel, ref, inputs, names, n_out=1):
    """Compare kernel(*inputs) with ref(*inputs) forward and backward (float tensors get grads)."""
    float_idx = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    mk = lambda up: [(_leaf(t, upcast=up) if i in float_idx else t) for i, t in enumerate(inputs)]  # noqa: E731
    k_in, hi_in, lo_in = mk(False), mk(True), mk(False)
    with torch.no_grad():
        probe = kernel(*[t.detach() if isinstance(t, torch.Tensor) else t for t in k_in])
    probe = probe if isinstance(probe, tuple) else (probe,)
    gouts = [torch.randn_like(o) for o in probe]
    k_out, k_g = _grads(kernel, k_in, gouts)
    hi_out, hi_g = _grads(lambda *a: ref(*a, upcast=True), hi_in, gouts)
    lo_out, lo_g = _grads(ref, lo_in, gouts)
    for j in range(n_out):
        assert k_out[j].dtype == lo_out[j].dtype
        assert_close_to_ref(k_out[j], hi_out[j], lo_out[j], f"out[{j}]")
    for i in float_idx:
        assert k_g[i] is not None and k_g[i].dtype == inputs[i].dtype, f"grad of {names[i]}"
        assert_close_to_ref(k_g[i], hi_g[i], lo_g[i], f"d{names[i]}")


# ---------------------------------------------------------------------------------------------
# LayerNorm, add + LayerNorm, bias + GELU
# ---------------------------------------------------------------------------------------------

LN_SHAPES = [(1, 1, 1), (3, 7, 257), (2, 768), (5, 1024), (3, 1280), (2, 1600)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layer_norm(dev, dtype, shape):
    C = shape[-1]
    x = torch.randn(shape, device=dev, dtype=dtype) * 2 + 0.5
    w = torch.randn(C, device=dev, dtype=dtype)
    b = torch.randn(C, device=dev, dtype=dtype)
    _check_op(lambda x, w, b: ext.layer_norm(x, w, b, 1e-5),
              lambda x, w, b, upcast=False: reference.layer_norm_ref(x, w, b, 1e-5, upcast),
              [x, w, b], ["x", "weight", "bias"])


@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_layer_norm_without_affine(dev, affine):
    x = torch.randn(4, 9, 33, device=dev)
    w = torch.randn(33, device=dev) if affine == "weight_only" else None
    _check_op(lambda x, w: ext.layer_norm(x, w, None, 1e-5),
              lambda x, w, upcast=False: reference.layer_norm_ref(x, w, None, 1e-5, upcast),
              [x, w], ["x", "weight"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 257), (2, 5, 768), (3, 1600)])
def test_add_layer_norm(dev, dtype, shape):
    C = shape[-1]
    x = torch.randn(shape, device=dev, dtype=dtype)
    r = torch.randn(shape, device=dev, dtype=dtype) * 3
    w = torch.randn(C, device=dev, dtype=dtype)
    b = torch.randn(C, device=dev, dtype=dtype)
    _check_op(lambda x, r, w, b: ext.add_layer_norm(x, r, w, b, 1e-5),
              lambda x, r, w, b, upcast=False: reference.add_layer_norm_ref(x, r, w, b, 1e-5, upcast),
              [x, r, w, b], ["x", "residual", "weight", "bias"], n_out=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 257), (2, 3072), (4, 5, 100)])
def test_bias_gelu(dev, dtype, shape):
    x = torch.randn(shape, device=dev, dtype=dtype) * 3
    b = torch.randn(shape[-1], device=dev, dtype=dtype)
    _check_op(lambda x, b: ext.bias_gelu(x, b),
              lambda x, b, upcast=False: reference.bias_gelu_ref(x, b, upcast),
              [x, b], ["x", "bias"])


def test_bias_gelu_without_bias_and_extremes(dev):
    x = torch.tensor([[-1e4, -30.0, -9.5, -3.0, -1e-3, 0.0, 1e-6, 2.0, 9.5, 30.0, 1e4]], device=dev)
    _check_op(lambda x: ext.bias_gelu(x, None),
              lambda x, upcast=False: reference.bias_gelu_ref(x, None, upcast), [x], ["x"])


# ---------------------------------------------------------------------------------------------
# attention and decode attention
# ---------------------------------------------------------------------------------------------

def _bthd(B, H, T, D, dev, dtype):
    """(B, H, T, D) as the model makes it: a transposed view of (B, T, H, D) memory."""
    return torch.randn(B, T, H, D, device=dev, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (1, 1, 1, 1, 1, True), (2, 3, 7, 7, 16, True), (1, 2, 130, 130, 64, True),
    (2, 1, 5, 67, 32, True), (1, 2, 33, 20, 8, False), (2, 2, 65, 65, 64, False)])
def test_attention(dev, dtype, B, H, Tq, Tk, D, causal):
    q, k, v = _bthd(B, H, Tq, D, dev, dtype), _bthd(B, H, Tk, D, dev, dtype), _bthd(B, H, Tk, D, dev, dtype)
    _check_op(lambda q, k, v: ext.attention(q, k, v, causal),
              lambda q, k, v, upcast=False: reference.attention_ref(q, k, v, causal, 0.0, None, upcast),
              [q, k, v], ["q", "k", "v"])


def test_attention_scale_and_layout(dev):
    q, k, v = (_bthd(2, 3, 19, 16, dev, torch.float32) for _ in range(3))
    out = ext.attention(q, k, v, True, 0.0, 0.3)
    assert_close_to_ref(out, reference.attention_ref(q, k, v, True, 0.0, 0.3, upcast=True),
                        reference.attention_ref(q, k, v, True, 0.0, 0.3))
    # (B, H, T, D) over (B, T, H, D) memory, so the model's transpose-reshape is free
    assert out.transpose(1, 2).is_contiguous()


def test_attention_backward_imports_nothing(dev, monkeypatch):
    """AttentionFunction.backward reads the Triton backward op resolved once (when the extension
    loads): an import inside a backward that torch.compile traces would break its graph."""
    def imports(fn) -> bool:
        return any(ins.opname == "IMPORT_NAME" for ins in dis.get_instructions(fn))
    backward = ext.AttentionFunction.backward
    called = [getattr(ext, n) for n in backward.__code__.co_names if inspect.isfunction(getattr(ext, n, None))]
    assert not imports(backward) and not [f.__name__ for f in called if imports(f)]
    resolved = ext.resolve_triton_attention_bwd()
    ours, real_import = [], builtins.__import__

    def watch(name, *args, **kwargs):
        if "gpt2_fast" in name or "kernels" in name or "triton" in name:
            ours.append(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", watch)
    assert ext.resolve_triton_attention_bwd() is resolved   # cached: the second call imports nothing
    q, k, v = (_bthd(1, 2, 9, 16, dev, torch.float32).detach().requires_grad_() for _ in range(3))
    ext.AttentionFunction.apply(q, k, v, True, 0.25).sum().backward()
    assert ours == [] and q.grad is not None and v.grad is not None
    if dev.type == "cuda":
        assert ext._TRITON_ATTENTION_BWD is resolved


def _decode_case(dev, dtype, B, H, Tq, S, D, kv_len, kv_start):
    q = _bthd(B, H, Tq, D, dev, dtype)
    kc = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    vc = torch.randn(B, H, S, D, device=dev, dtype=dtype)
    kv_len = torch.tensor(kv_len, device=dev, dtype=torch.int32)
    kv_start = None if kv_start is None else torch.tensor(kv_start, device=dev, dtype=torch.int64)
    out = ext.decode_attention(q, kc, vc, kv_len, kv_start)
    hi = reference.decode_attention_ref(q, kc, vc, kv_len, kv_start, None, upcast=True)
    lo = reference.decode_attention_ref(q, kc, vc, kv_len, kv_start)
    assert_close_to_ref(out, hi, lo)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Tq,S,D,kv_len,kv_start", [
    (1, 1, 1, 1, 1, [1], None),
    (3, 2, 1, 37, 16, [1, 20, 37], None),
    (3, 2, 1, 37, 16, [5, 20, 37], [2, 0, 30]),
    (2, 3, 4, 70, 64, [4, 70], [0, 11]),
    (2, 2, 5, 40, 8, [33, 9], [0, 0]),
])
def test_decode_attention(dev, dtype, B, H, Tq, S, D, kv_len, kv_start):
    _decode_case(dev, dtype, B, H, Tq, S, D, kv_len, kv_start)


def test_decode_attention_empty_window_gives_zeros(dev):
    # sequence 0: query 0 sees slots 3..1 (nothing) -> zeros; query 1 sees slot 3..2 -> zeros too
    out = _decode_case(dev, torch.float32, 2, 2, 3, 12, 8, [4, 12], [3, 0])
    assert (out[0, :, :2] == 0).all() and (out[0, :, 2] != 0).any()


def test_decode_attention_matches_attention_on_full_cache(dev):
    B, H, T, D = 2, 3, 24, 16
    q, k, v = (_bthd(B, H, T, D, dev, torch.float32) for _ in range(3))
    full = ext.attention(q, k, v, True)
    cached = ext.decode_attention(q, k.contiguous(), v.contiguous(), torch.full((B,), T, dtype=torch.int32))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# plumbing: errors, dispatcher, fake tensors, loading
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise(dev):
    x = torch.randn(4, 8, device=dev)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ext.layer_norm(x, torch.ones(7, device=dev), None)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ext.bias_gelu([1.0, 2.0], None)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ext.add_layer_norm(x, torch.randn(4, 9, device=dev), None, None)
    q = torch.randn(1, 2, 3, 4, device=dev)
    with pytest.raises(ValueError, match="k must be 4-D"):
        ext.attention(q, torch.randn(2, 3, 4, device=dev), q)
    with pytest.raises(ValueError, match="expected k and v of shape"):
        ext.attention(q, torch.randn(1, 2, 3, 5, device=dev), q)
    with pytest.raises(TypeError, match="kv_len must be an integer tensor"):
        ext.decode_attention(q, q, q, torch.ones(1, device=dev))
    with pytest.raises(RuntimeError, match="must be contiguous"):  # the C++ checks, called directly
        torch.ops.gpt2_fast.layer_norm_fwd(x.t(), None, None, 1e-5)


def test_float64_goes_to_reference(dev):
    x = torch.randn(3, 5, device=dev, dtype=torch.float64)
    torch.testing.assert_close(ext.layer_norm(x, None, None), reference.layer_norm_ref(x, None, None))


def test_dispatcher_backend_cpp_and_cuda(dev):
    name = "cpp" if dev.type == "cpu" else "cuda"
    x = torch.randn(2, 3, 64, device=dev)
    b = torch.randn(64, device=dev)
    assert ops.resolve("bias_gelu", name, dev.type)[0] == name
    torch.testing.assert_close(ops.bias_gelu(x, b, backend=name), ext.bias_gelu(x, b), rtol=0, atol=0)
    assert ops.resolve("softmax_cross_entropy", name, dev.type)[0] in ("torch",)
    for op in ext.CPU_AUTO_OPS:
        assert op in ext.OPS
    if dev.type == "cpu":
        assert ops.resolve("layer_norm", "auto", "cpu")[0] == ("cpp" if "layer_norm" in ext.CPU_AUTO_OPS
                                                               else "torch")


def test_fake_tensor_shapes(dev):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(6, 40, device=dev, dtype=torch.bfloat16)
        y, mean, rstd = torch.ops.gpt2_fast.layer_norm_fwd(x, None, None, 1e-5)
        assert y.shape == x.shape and y.dtype == x.dtype and mean.shape == (6,) and rstd.dtype == torch.float32
        dx, dw, db = torch.ops.gpt2_fast.layer_norm_bwd(x, x, None, mean, rstd, None)
        assert dx.shape == x.shape and dw.shape == (40,)
        q = torch.empty(2, 3, 5, 8, device=dev)
        o, lse = torch.ops.gpt2_fast.attention_fwd(q, q, q, True, 0.5)
        assert o.shape == q.shape and lse.shape == (2, 3, 5)
        o = torch.ops.gpt2_fast.decode_attention_fwd(q, q, q, torch.empty(2, dtype=torch.int32, device=dev),
                                                     None, 0.5)
        assert o.shape == q.shape


def test_opcheck_layer_norm_and_gelu(dev):
    x = torch.randn(5, 24, device=dev)
    w, b = torch.randn(24, device=dev), torch.randn(24, device=dev)
    torch.library.opcheck(torch.ops.gpt2_fast.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.gpt2_fast.bias_gelu_fwd.default, (x, b))
    q = torch.randn(1, 2, 9, 8, device=dev)
    torch.library.opcheck(torch.ops.gpt2_fast.attention_fwd.default, (q, q, q, True, 0.3))


def test_poison_reaches_cpp_outputs(dev):
    # conftest sets GPT2_FAST_POISON=1: an empty op output must come out NaN-filled, not stale.
    assert os.environ.get("GPT2_FAST_POISON") == "1"
    q = torch.randn(1, 1, 0, 4, device=dev)
    o, lse = torch.ops.gpt2_fast.attention_fwd(q, q, q, True, 1.0)
    assert o.shape == (1, 1, 0, 4)


def test_import_without_extension_says_why():
    code = ("import gpt2_fast.extension as e, gpt2_fast.ops as o; print(e.unavailable_reason('cpu')); "
            "print(o.resolve('layer_norm', 'auto', 'cpu')[0])")
    env = dict(os.environ, GPT2_FAST_SKIP_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "GPT2_FAST_SKIP_EXT=1" in lines[0] and lines[1] == "torch"


def test_cuda_unavailable_reason_on_cpu_build():
    if ext._C is None:
        pytest.skip(f"extension not loaded: {ext.unavailable_reason('cpu')}")
    if ext._C.WITH_CUDA:
        assert ext.unavailable_reason("cuda") is None or not torch.cuda.is_available()
    else:
        assert "without CUDA" in ext.unavailable_reason("cuda")
        assert not ext.supports("layer_norm", "cuda")


def test_model_forward_backward_with_cpp_backend():
    if ext.unavailable_reason("cpu"):
        pytest.skip(ext.unavailable_reason("cpu"))
    from gpt2_fast.config import GPTConfig
    from gpt2_fast.model import GPT
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=16, backend="torch")
    model = GPT(cfg)
    idx = torch.randint(0, 97, (2, 16))
    _, loss_ref = model(idx, targets=idx)
    loss_ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_backend("cpp")
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-5, msg=n)

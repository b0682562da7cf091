"""Every fused op on every backend under torch.autocast (CPU; bf16 and fp16) with the mixed inputs
training makes (fp32 parameters and residual stream, 16-bit Linear outputs): output dtypes follow
gpt2_fast/reference.py's rules, values and every gradient match the reference under the same
autocast (flash-attention tolerance: error vs float64 <= 2x the reference's own + atol). Then a
full AdamW step of a tiny GPT and patch_hf training with labels, each backend vs backend torch.

CPU autocast goes through the same dispatch keys as CUDA autocast, so these run in CI. Backends:
triton (kernels/, under TRITON_INTERPRET=1 here), cpp (gpt2_fast.extension; its Python wrappers
are the cuda backend's too), torch (gpt2_fast.reference). cpp has no fused cross-entropy: there
the dispatcher takes torch's, tested as torch.
"""
import copy
import importlib
import os

import pytest
import torch

from gpt2_fast import GPT, GPTConfig, extension, reference
from gpt2_fast.kernels import _EXPORTS
from tolerance import ATOL, assert_close_to_ref, assert_close_triton

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter tails

AUTOCAST = [torch.bfloat16, torch.float16]
BACKENDS = ["triton", "cpp", "torch"]
F32 = torch.float32


def _op(backend: str, op: str, device_type: str = "cpu"):
    """The backend's public function for op (skips when this machine cannot run it)."""
    if backend == "torch":
        return getattr(reference, op + "_ref")
    if backend == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import")
        return getattr(importlib.import_module(f"gpt2_fast.kernels.{_EXPORTS[op]}"), op)
    if (backend == "cuda") != (device_type == "cuda"):
        pytest.skip(f"backend {backend} runs on {'CUDA' if backend == 'cuda' else 'CPU'} tensors only")
    why = extension.unavailable_reason(device_type)
    if why:
        pytest.skip(f"{backend} backend: {why}")
    if op not in extension.OPS:
        pytest.skip(f"cpp backend has no {op}: the dispatcher runs torch's (tested as torch)")
    return getattr(extension, op)


def _leaf(shape, dtype, scale=1.0, shift=0.0):
    return (scale * torch.randn(shape) + shift).to(dtype).requires_grad_()


def _hi(t):
    return t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _outs(o):
    return o if isinstance(o, tuple) else (o,)


def _check(backend, op, args, ac, want_dtypes, grad=True, **kernel_kw):
    """op(*args) of `backend` under autocast(ac) vs the reference under the same autocast and the
    float64 reference; outputs must have want_dtypes, gradients their inputs' dtypes."""
    fn, ref = _op(backend, op), getattr(reference, op + "_ref")
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] if grad else []
    hi_args = [_hi(a) for a in args]
    hi_leaves = [h for a, h in zip(args, hi_args) if any(a is t for t in leaves)]
    with torch.autocast("cpu", dtype=ac), torch.set_grad_enabled(grad):
        out = _outs(fn(*args, **kernel_kw))
        lo = _outs(ref(*args))
    hi = _outs(ref(*hi_args, upcast=True))
    assert [o.dtype for o in out] == list(want_dtypes), f"{op} output dtypes under {ac} autocast"
    assert [o.dtype for o in lo] == list(want_dtypes), f"reference {op} output dtypes under {ac} autocast"
    close = assert_close_triton if backend == "triton" else assert_close_to_ref
    for j, (o, h, lo_j) in enumerate(zip(out, hi, lo)):
        close(o, h, lo_j, f"{op} out[{j}]")
    if not leaves:
        return
    gouts = [torch.randn(o.shape, dtype=F32).to(o.dtype) for o in out]
    g = torch.autograd.grad(out, leaves, gouts)
    g_lo = torch.autograd.grad(lo, leaves, gouts)
    g_hi = torch.autograd.grad(hi, hi_leaves, [t.double() for t in gouts])
    for i, (a, gi, gl, gh) in enumerate(zip(leaves, g, g_lo, g_hi)):
        assert gi.dtype == a.dtype, f"{op}: grad {i} is {gi.dtype}, its input {a.dtype}"
        close(gi, gh, gl, f"{op} grad {i}")


# ---------------------------------------------------------------------------------------------
# each op, mixed inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [F32, "ac"])
def test_layer_norm(backend, ac, x_dtype):
    x = _leaf((3, 5, 65), ac if x_dtype == "ac" else F32, 2.0, 0.5)  # the fp32 residual stream
    w, b = _leaf(65, F32, 0.5, 1.0), _leaf(65, F32, 0.5)
    _check(backend, "layer_norm", (x, w, b, 1e-5), ac, [ac])         # writes the autocast dtype


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["model", "hf"])
def test_add_layer_norm(backend, ac, order):
    stream, branch = _leaf((2, 7, 96), F32, 3.0), _leaf((2, 7, 96), ac)
    w, b = _leaf(96, F32, 0.5, 1.0), _leaf(96, F32, 0.5)
    x, r = (stream, branch) if order == "model" else (branch, stream)  # patch_hf passes (attn, residual)
    _check(backend, "add_layer_norm", (x, r, w, b, 1e-5), ac, [F32, ac])  # s keeps fp32


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu(backend, ac):
    h, bias = _leaf((3, 4, 130), ac, 3.0), _leaf(130, F32)          # c_fc's output, fp32 bias
    _check(backend, "bias_gelu", (h, bias), ac, [ac])


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_cross_entropy(backend, ac):
    logits = _leaf((11, 97), ac, 4.0)
    t = torch.randint(0, 97, (11,))
    t[3] = -100
    _check(backend, "softmax_cross_entropy", (logits, t, -100), ac, [F32])


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype", ["ac", F32])
def test_lm_head_cross_entropy(backend, ac, hidden_dtype):
    hidden = _leaf((13, 32), ac if hidden_dtype == "ac" else F32)
    weight = _leaf((70, 32), F32, 0.3)                               # tied fp32 embedding, padded
    t = torch.randint(0, 67, (13,))
    t[0] = -100
    kw = dict(chunk_rows=4) if backend == "triton" else {}          # several chunks: dW adds up
    _check(backend, "lm_head_cross_entropy", (hidden, weight, t, -100, 67), ac, [F32], **kw)


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [True, False])
def test_attention(backend, ac, grad):
    q, k, v = (_leaf((1, 2, 19, 32), ac) for _ in range(3))          # c_attn's output
    _check(backend, "attention", (q, k, v, True), ac, [ac], grad=grad)


@pytest.mark.parametrize("ac", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention(backend, ac):
    q = _leaf((2, 2, 1, 32), ac)
    kc, vc = _leaf((2, 2, 24, 32), ac), _leaf((2, 2, 24, 32), ac)
    kv_len = torch.tensor([24, 9], dtype=torch.int32)
    _check(backend, "decode_attention", (q, kc, vc, kv_len), ac, [ac], grad=False)


def test_fused_lm_head_weight_grad_accumulates_in_fp32():
    """Many chunks: dW summed in fp32 (not rounded per chunk), so it stays as close to the float64
    result as one chunk gets; a per-chunk bf16 rounding would add ~sqrt(chunks) bf16 ulps."""
    _op("triton", "lm_head_cross_entropy")
    ce = importlib.import_module("gpt2_fast.kernels.cross_entropy")
    hidden, weight = _leaf((24, 16), torch.bfloat16), _leaf((40, 16), F32, 0.3)
    t = torch.randint(0, 40, (24,))
    dws = []
    for chunk in (1, 24):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ce.lm_head_cross_entropy(hidden, weight, t, chunk_rows=chunk)
        dws.append(torch.autograd.grad(loss, weight)[0])
    assert dws[0].dtype == F32
    torch.testing.assert_close(dws[0], dws[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda", "cpp", "torch"])
def test_autocast_reads_trace_without_graph_breaks(backend):
    """Each wrapper reads autocast before its autograd.Function / registered op; torch.compile
    folds those reads into guarded constants (fullgraph: a graph break would raise). On CPU
    dynamo alone (backend "eager"); Triton's ops compile only on CUDA (the interpreter cannot run
    on fake tensors), where inductor compiles them, the fused loss's fp32 dW product included."""
    dev = "cuda" if backend in ("triton", "cuda") else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch.compile of the Triton / CUDA ops needs a GPU")
    ln, add_ln, gelu = (_op(backend, op, dev) for op in ("layer_norm", "add_layer_norm", "bias_gelu"))
    ce = _op("triton" if backend == "triton" else "torch", "lm_head_cross_entropy", dev)

    def step(x, r, w, b, W, t):
        s, y = add_ln(x, r, w, b)
        z = ln(s, w, b)
        return s, y, gelu(y, b), ce(z.reshape(-1, 64), W, t)
    args = [torch.randn(4, 64), torch.randn(4, 64).bfloat16(), torch.ones(64), torch.zeros(64),
            torch.randn(111, 64), torch.randint(0, 111, (4,))]
    args = [a.to(dev).requires_grad_(a.is_floating_point()) for a in args]
    compiled = torch.compile(step, backend="inductor" if dev == "cuda" else "eager", fullgraph=True)
    with torch.autocast(dev, dtype=torch.bfloat16):
        out, want = compiled(*args), step(*args)
    assert [o.dtype for o in out] == [F32, torch.bfloat16, torch.bfloat16, F32]
    for o, e in zip(out, want):
        torch.testing.assert_close(o, e, atol=2e-2, rtol=2e-2)
    out[-1].backward()
    out = compiled(*args)                                            # autocast off: recompiled
    assert [o.dtype for o in out] == [F32, F32, F32, F32]


# ---------------------------------------------------------------------------------------------
# a full training step, and patch_hf, under autocast
# ---------------------------------------------------------------------------------------------

CFG = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=97, block_size=64, dropout=0.0)
B, T, LR = 1, 37, 1e-3
LOSS_ATOL = 1e-4  # x |loss|: a scalar mean, where the 16-bit errors of torch may cancel by luck


def _train_step(model, fused, ac):
    """One AdamW step: (loss, {name: grad}, {name: param after the step})."""
    dev = next(model.parameters()).device
    torch.manual_seed(1)
    idx = torch.randint(0, CFG["vocab_size"], (B, T)).to(dev)
    targets = torch.randint(0, CFG["vocab_size"], (B, T)).to(dev)
    targets[0, :3] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    with torch.autocast(dev.type, dtype=ac or F32, enabled=ac is not None):
        _, loss = model(idx, targets, return_logits=not fused)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


_REFS: dict = {}


def _gpt_refs(device):
    """Per fused flag: the tiny GPT's step with backend torch in fp32 without autocast (the
    "exact" side: its error is ~1e4 x below bf16's) and under bf16 autocast, same weights."""
    if device.type in _REFS:
        return _REFS[device.type]
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CFG, backend="torch")).to(device)
    out = {"base": base}
    for fused in (True, False):
        out[fused, "hi"] = _train_step(copy.deepcopy(base), fused, None)
        out[fused, "lo"] = _train_step(copy.deepcopy(base), fused, torch.bfloat16)
    _REFS[device.type] = out
    return out


def _close_to_ref(name, got, hi, lo, atol):
    """|got - hi| <= 2 |lo - hi| + atol, elementwise maxima (the kernel-test scheme, model-wide).
    Returns that bound."""
    assert got.dtype == lo.dtype, f"{name}: {got.dtype} != {lo.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got.double() - hi).abs().max().item()
    bound = 2 * (lo.double() - hi).abs().max().item() + atol
    assert err <= bound, f"{name}: error {err:.3e} vs fp32 exceeds 2 x torch's + atol = {bound:.3e}"
    return bound


def _step_close(name, got, hi, p0, grad_hi, grad_bound):
    """AdamW's first step is lr * g / (|g| + eps) plus the decay: ~lr * sign(g). Where |g| exceeds
    the gradient's error bound its sign is certain and the steps must agree (to 5% of lr); where it
    does not, a 16-bit sign flip may move it by up to 2 lr, never more."""
    assert not torch.isnan(got).any(), f"{name}: NaN after the step"
    d = (got.double() - p0.double()) - (hi.double() - p0.double())
    assert d.abs().max().item() <= 2.02 * LR, f"{name}: a step larger than AdamW's"
    sure = grad_hi.abs() > grad_bound
    torch.testing.assert_close(d[sure], torch.zeros_like(d[sure]), atol=0.05 * LR, rtol=0.0,
                               msg=lambda m: f"{name} (AdamW step where the gradient's sign is sure): {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused_loss", "logits_loss"])
@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda", "torch"])
def test_gpt_train_step_under_autocast(device, backend, fused):
    _op(backend, "layer_norm", device.type)  # skips when the backend cannot run here
    gpt_refs = _gpt_refs(device)
    model = copy.deepcopy(gpt_refs["base"]).set_backend(backend)
    loss, grads, params = _train_step(model, fused, torch.bfloat16)
    loss_hi, grads_hi, params_hi = gpt_refs[fused, "hi"]
    loss_lo, grads_lo, _ = gpt_refs[fused, "lo"]
    assert loss.dtype == F32
    _close_to_ref("loss", loss, loss_hi, loss_lo, LOSS_ATOL * loss_hi.abs().item())
    p0 = dict(gpt_refs["base"].named_parameters())
    for n in grads_hi:
        bound = _close_to_ref(f"grad {n}", grads[n], grads_hi[n], grads_lo[n], ATOL[F32])
        _step_close(n, params[n], params_hi[n], p0[n], grads_hi[n], bound)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_loss", "logits_loss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_hf_training_under_autocast(backend, fused):
    transformers = pytest.importorskip("transformers")
    from gpt2_fast import patch_hf
    if backend != "torch":
        _op(backend, "layer_norm")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=97, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(cfg).train()                 # HF's default attention (sdpa)
    fast = patch_hf(copy.deepcopy(ref), backend=backend, skip_logits=fused)  # True: fused LM-head loss
    idx = torch.randint(0, 97, (B, T))
    labels = idx.clone()
    labels[0, :5] = -100
    results = {}
    for name, model, ac in (("hi", copy.deepcopy(ref), None), ("lo", ref, torch.bfloat16),
                            ("fast", fast, torch.bfloat16)):
        with torch.autocast("cpu", dtype=ac or F32, enabled=ac is not None):
            out = model(idx, labels=labels)
        out.loss.backward()
        results[name] = (out, {n: p.grad for n, p in model.named_parameters()})
    (out_fast, g_fast), (out_lo, g_lo), (out_hi, g_hi) = results["fast"], results["lo"], results["hi"]
    assert (out_fast.logits is None) == fused, "skip_logits=True: the fused LM-head loss, no logits"
    if not fused:
        _close_to_ref("logits", out_fast.logits, out_hi.logits, out_lo.logits, ATOL[torch.bfloat16])
    _close_to_ref("loss", out_fast.loss, out_hi.loss, out_lo.loss, LOSS_ATOL * out_hi.loss.abs().item())
    for n in g_hi:
        _close_to_ref(f"grad {n}", g_fast[n], g_hi[n], g_lo[n], ATOL[F32])

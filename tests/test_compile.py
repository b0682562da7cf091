"""torch.compile(fullgraph=True) of a whole training step (forward + loss, then the compiled
backward) of our GPT and of a patch_hf-patched transformers GPT-2, for every kernel backend: one
graph, zero graph breaks, no recompile on the second step, and the loss and every gradient equal
to eager. Plus the dispatch that makes it possible: ops resolved once (ops.dispatch), never per call.

On CPU the Triton backend runs under TRITON_INTERPRET=1, where its ops are opaque custom ops
(kernels/_registry.py); compile backends: "aot_eager" (the default run: backend auto; the rest slow)
and "inductor" (needs a C++ compiler; slow). On CUDA the same tests run on the GPU.
"""
import copy
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from gpt2_fast import GPT, GPTConfig, ops, reference

SLOW = pytest.mark.slow
V = 101
N_LAYER = 1  # one block: the graph-break count is per block, and compile time grows with depth


def _params(compile_backends):
    """(kernel backend, compile backend) cases: auto + aot_eager in the default run, the rest slow."""
    out = []
    for cb in compile_backends:
        for kb in ("auto", "cpp", "torch", "triton"):
            marks = [] if (kb, cb) == ("auto", "aot_eager") else [SLOW]
            out.append(pytest.param(kb, cb, marks=marks, id=f"{kb}-{cb}"))
    return out


CASES = _params(("aot_eager", "inductor"))


def _skip_unusable(kernel_backend, device):
    if kernel_backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import")
    if kernel_backend == "cpp":
        if device.type != "cpu":
            pytest.skip("cpp is the CPU backend")
        why = ops.backend_status("cpu")["cpp"]
        if why:
            pytest.skip(why)


def _compiled_step_matches_eager(model, step, idx, compile_backend):
    """Compile step(model, idx) -> loss with fullgraph=True; run two training steps; return the
    graph-break count after checking one graph, no recompile, and loss/grads == eager."""
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(lambda i: step(model, i), backend=counter, fullgraph=True)
    for _ in range(2):  # the second step must reuse the graph (no per-call state in the guards)
        model.zero_grad(set_to_none=True)
        loss = compiled(idx)
        loss.backward()
    breaks = sum(counters["graph_break"].values())
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled, expected 1"
    loss_ref = step(ref, idx)
    loss_ref.backward()
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, loss_ref, **tol)
    grads_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **tol, msg=lambda m: f"grad {name}: {m}")
    return breaks


# ---------------------------------------------------------------------------------------------
# our GPT
# ---------------------------------------------------------------------------------------------

def _gpt(backend, device):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=N_LAYER, n_head=2, n_embd=32, vocab_size=V, block_size=16,
                         backend=backend)).to(device)


@pytest.mark.parametrize("kernel_backend,compile_backend", CASES)
def test_gpt_training_step_fullgraph(device, kernel_backend, compile_backend):
    _skip_unusable(kernel_backend, device)
    model = _gpt(kernel_backend, device)
    idx = torch.randint(0, V, (2, 8), device=device)
    breaks = _compiled_step_matches_eager(model, lambda m, i: m(i, i)[1], idx, compile_backend)
    assert breaks == 0


@SLOW
@pytest.mark.parametrize("kernel_backend", ["auto", "triton"])
def test_gpt_fused_lm_head_loss_fullgraph(device, kernel_backend):
    _skip_unusable(kernel_backend, device)
    model = _gpt(kernel_backend, device)
    idx = torch.randint(0, V, (2, 8), device=device)
    step = lambda m, i: m(i, i, return_logits=False)[1]  # noqa: E731
    assert _compiled_step_matches_eager(model, step, idx, "aot_eager") == 0


# ---------------------------------------------------------------------------------------------
# a patched transformers GPT2LMHeadModel
# ---------------------------------------------------------------------------------------------

def _patched_hf(backend, device, **patch_kw):
    transformers = pytest.importorskip("transformers")
    from gpt2_fast import patch_hf
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return patch_hf(transformers.GPT2LMHeadModel(cfg).to(device), backend=backend, **patch_kw)


@pytest.mark.parametrize("kernel_backend,compile_backend",
                         [pytest.param(*p.values, marks=[SLOW], id=p.id) for p in CASES])
def test_patched_hf_training_step_fullgraph(device, kernel_backend, compile_backend):
    _skip_unusable(kernel_backend, device)
    model = _patched_hf(kernel_backend, device).train()
    idx = torch.randint(0, V, (2, 8), device=device)
    breaks = _compiled_step_matches_eager(model, lambda m, i: m(i, labels=i).loss, idx, compile_backend)
    assert breaks == 0


@SLOW
def test_patched_hf_fused_loss_fullgraph(device):
    model = _patched_hf("auto", device, skip_logits=True).train()
    idx = torch.randint(0, V, (2, 8), device=device)
    assert _compiled_step_matches_eager(model, lambda m, i: m(i, labels=i).loss, idx, "aot_eager") == 0


# ---------------------------------------------------------------------------------------------
# dispatch: resolved once, outside the forward
# ---------------------------------------------------------------------------------------------

def _forbid_lookups(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a forward pass resolved a backend (import / registry look-up)")
    for name in ("resolve", "_backend_module", "requested_backend", "dispatch"):
        monkeypatch.setattr(ops, name, boom)


@pytest.mark.parametrize("backend", ["auto", pytest.param("torch", marks=SLOW), pytest.param("cpp", marks=SLOW)])
def test_forward_does_no_lookups(monkeypatch, backend):
    model = _gpt(backend, torch.device("cpu"))
    idx = torch.randint(0, V, (2, 8))
    _forbid_lookups(monkeypatch)
    model(idx, idx)[1].backward()
    model(idx, idx, return_logits=False)


def test_patched_hf_forward_does_no_lookups(monkeypatch):
    model = _patched_hf("auto", torch.device("cpu"))
    idx = torch.randint(0, V, (2, 8))
    _forbid_lookups(monkeypatch)
    model(idx, labels=idx).loss.backward()


def test_env_override_is_read_when_resolved(monkeypatch):
    monkeypatch.setenv("GPT2_FAST_BACKEND", "torch")
    model = _gpt("cpp", torch.device("cpu"))
    assert model.kernels.backend == "torch" and model.transformer.h[0].attn.kernels.backend == "torch"
    assert set(model.kernels.names("cpu").values()) == {"torch"}
    monkeypatch.setenv("GPT2_FAST_BACKEND", "cpp")  # later changes wait for set_backend
    assert model.transformer.h[-1].mlp.kernels.backend == "torch"
    model.set_backend("torch")
    assert model.transformer.h[-1].mlp.kernels.backend == "cpp" and model.config.backend == "torch"


def test_kernels_copy_and_pickle_to_the_same_resolution():
    import pickle
    k = ops.dispatch("torch")
    assert copy.deepcopy(k) is k and pickle.loads(pickle.dumps(k)) is k
    model = copy.deepcopy(_gpt("torch", torch.device("cpu")))
    assert model.kernels is k


def test_unusable_backend_raises_when_called_with_the_reason(monkeypatch):
    model = _gpt("cuda", torch.device("cpu"))  # built anywhere, fails where it runs
    with pytest.raises(ops.BackendUnavailable, match="needs CUDA tensors"):
        model(torch.randint(0, V, (1, 4)))


def test_attention_fwd_choice_picks_sdpa_on_cuda_only(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("GPT2_FAST_ATTN_FWD", "sdpa")
    k = ops.dispatch("auto")
    names = k.names("cuda")  # resolution only: no CUDA device needed
    assert names["attention"] == ("sdpa" if names["layer_norm"] == "triton" else names["attention"])
    assert k.names("cpu")["attention"] != "sdpa"
    assert ops.dispatch("triton").names("cuda")["attention"] == "sdpa"
    assert ops.dispatch("torch").names("cuda")["attention"] == "torch"
    monkeypatch.setenv("GPT2_FAST_ATTN_FWD", "triton")
    assert ops.dispatch("triton").names("cuda")["attention"] == "triton"


@pytest.mark.parametrize("Tq,Tk", [pytest.param(7, 7, marks=SLOW), (3, 9), pytest.param(1, 5, marks=SLOW)])
def test_sdpa_attention_matches_reference(Tq, Tk):
    q = torch.randn(2, 3, Tq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, Tk, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, Tk, 16, dtype=torch.float64, requires_grad=True)
    for causal in (True, False):
        out = ops.sdpa_attention(q, k, v, causal=causal, scale=0.3)
        want = reference.attention_ref(q, k, v, causal, 0.0, 0.3, upcast=True)  # fp64 math
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        grads_ref = torch.autograd.grad(want, (q, k, v), g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b)

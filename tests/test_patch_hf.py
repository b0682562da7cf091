"""gpt2_fast.patch_hf: a patched transformers GPT2LMHeadModel equals the unpatched one
(logits, loss, every parameter gradient, cached generation, padding masks)."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gpt2_fast.hf_patch import GPT2FastLayerNorm, patch_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

V = 300


def _hf(device, **over):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=V, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **over)
    model = GPT2LMHeadModel(cfg).to(device)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(params=["torch", "triton"])
def backend(request, device):
    if request.param == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")
    return request.param


def _pair(device, backend, **over):
    ref = _hf(device, **over)
    fast = patch_hf(copy.deepcopy(ref), backend=backend)
    return ref, fast


def _close(a, b, name, atol=2e-5, rtol=1e-4):
    assert a is not None and b is not None, f"{name}: missing"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_modules_are_swapped_weights_kept(device):
    ref, fast = _pair(device, "torch")
    assert isinstance(fast.transformer.ln_f, GPT2FastLayerNorm)
    assert all(isinstance(b.ln_1, GPT2FastLayerNorm) and isinstance(b.ln_2, GPT2FastLayerNorm)
               for b in fast.transformer.h)
    assert type(fast.transformer.h[0].mlp).__name__ == "FastGPT2MLP"
    assert type(fast.transformer.h[0]).__name__ == "FastGPT2Block"
    assert fast.config._attn_implementation == "gpt2_fast"
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert sd_ref.keys() == sd_fast.keys()
    assert all(torch.equal(sd_ref[k], sd_fast[k]) for k in sd_ref)
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied


@pytest.mark.parametrize("B,T", [(2, 17), (1, 1)])
def test_logits_and_eval_loss_match(device, backend, B, T):
    ref, fast = _pair(device, backend)
    ref.eval(), fast.eval()
    idx = torch.randint(0, V, (B, T), device=device)
    labels = idx.clone()
    if T > 2:
        labels[0, 3] = -100
    out_ref = ref(idx, labels=labels)
    out_fast = fast(idx, labels=labels)
    _close(out_fast.logits, out_ref.logits, "logits")
    if T > 1:
        _close(out_fast.loss, out_ref.loss, "loss")
    else:  # one position: no target after the shift, NaN mean on both sides
        assert torch.isnan(out_fast.loss) and torch.isnan(out_ref.loss)


def test_training_loss_and_grads_match(device, backend):
    ref, fast = _pair(device, backend)
    ref.train(), fast.train()
    idx = torch.randint(0, V, (2, 19), device=device)
    labels = idx.clone()
    labels[1, :4] = -100
    out_ref = ref(idx, labels=labels)
    out_fast = fast(idx, labels=labels)
    assert out_fast.logits is None, "training with labels uses the fused LM-head loss"
    _close(out_fast.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out_fast.loss.backward()
    g_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        _close(p.grad, g_ref[name].grad, f"grad {name}")


def test_num_items_in_batch_and_tuple_output(device):
    ref, fast = _pair(device, "torch")
    idx = torch.randint(0, V, (2, 9), device=device)
    n = torch.tensor(40, device=device)
    _close(fast(idx, labels=idx, num_items_in_batch=n).loss, ref(idx, labels=idx, num_items_in_batch=n).loss,
           "loss with num_items_in_batch")
    fast.eval(), ref.eval()
    tup = fast(idx, labels=idx, return_dict=False)
    assert isinstance(tup, tuple)
    _close(tup[0], ref(idx, labels=idx).loss, "tuple loss")


def test_padding_mask_and_cached_generation(device, backend):
    ref, fast = _pair(device, backend)
    ref.eval(), fast.eval()
    idx = torch.randint(0, V, (2, 7), device=device)
    mask = torch.ones_like(idx)
    mask[1, :3] = 0  # left padding on row 1: HF's SDPA path with the mask
    keep = mask.bool()  # padded positions attend to nothing: eager and SDPA differ there, by design
    _close(fast(idx, attention_mask=mask).logits[keep], ref(idx, attention_mask=mask).logits[keep],
           "padded logits")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        g_ref = ref.generate(idx[:1], **kw)
        g_fast = fast.generate(idx[:1], **kw)
    assert torch.equal(g_fast, g_ref)


def test_other_activation_keeps_hf_mlp(device):
    model = patch_hf(_hf(device, activation_function="relu"), backend="torch")
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"
    idx = torch.randint(0, V, (1, 5), device=device)
    ref = _hf(device, activation_function="relu")
    ref.load_state_dict(model.state_dict())
    _close(model(idx).logits, ref(idx).logits, "relu model logits")


def test_ops_are_called(device, monkeypatch):
    from gpt2_fast import ops
    calls = {}
    for name in ("layer_norm", "add_layer_norm", "bias_gelu", "attention", "lm_head_cross_entropy", "softmax_cross_entropy"):
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    ref, fast = _pair(device, "torch")
    idx = torch.randint(0, V, (2, 8), device=device)
    fast.train()
    fast(idx, labels=idx).loss.backward()
    fast.eval()
    fast(idx, labels=idx)
    assert calls == {"layer_norm": 2 * 3, "add_layer_norm": 2 * 2, "bias_gelu": 2 * 2, "attention": 2 * 2,
                     "lm_head_cross_entropy": 1, "softmax_cross_entropy": 1}, calls


def test_save_load_and_pickle(device, tmp_path):
    import io
    ref, fast = _pair(device, "torch")
    fast.eval()
    idx = torch.randint(0, V, (1, 6), device=device)
    want = fast(idx, labels=idx).loss
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    _close(again(idx, labels=idx).loss, want, "loss after torch.save/load")
    fast.save_pretrained(tmp_path)  # loads back as a plain HF model, same weights
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).to(device).eval()
    assert type(plain.transformer.ln_f) is torch.nn.LayerNorm
    _close(plain(idx, labels=idx).loss, want, "loss of the saved checkpoint")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_still_works(device):
    ref, fast = _pair(device, "torch")
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.train(), fast.train()
    idx = torch.randint(0, V, (2, 9), device=device)
    out_ref, out_fast = ref(idx, labels=idx), fast(idx, labels=idx)
    _close(out_fast.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out_fast.loss.backward()
    g_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        _close(p.grad, g_ref[name].grad, f"grad {name}")


def test_cross_attention_blocks(device):
    ref, fast = _pair(device, "torch", add_cross_attention=True)
    ref.eval(), fast.eval()
    idx = torch.randint(0, V, (2, 6), device=device)
    enc = torch.randn(2, 5, 64, device=device)
    _close(fast(idx, encoder_hidden_states=enc).logits, ref(idx, encoder_hidden_states=enc).logits,
           "logits with cross-attention")


def test_bad_inputs():
    with pytest.raises(TypeError, match="GPT2LMHeadModel or GPT2Model"):
        patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_hf(_hf(torch.device("cpu")), backend="tpu")

"""gpt2_fast.patch_hf: a patched transformers GPT-2 behaves as the unpatched one in what transformers
documents for GPT-2 (logits, loss, gradients, caches, masks, generate, outputs, head classes,
config options, save/load), within kernel tolerance; what it cannot match it leaves to HF, warning."""
import copy
import io
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2 as hf  # noqa: E402

from gpt2_fast import ops  # noqa: E402
from gpt2_fast.hf_patch import GPT2FastLayerNorm, patch_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

V = 300
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                  classifier_dropout=0.0)


def _hf(device, cls=GPT2LMHeadModel, attn=None, **over):
    """A tiny random HF GPT-2 (HF's default attention, "sdpa", unless attn says otherwise)."""
    torch.manual_seed(0)
    cfg = GPT2Config(**{**dict(n_layer=2, n_head=2, n_embd=64, vocab_size=V, n_positions=64,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0), **NO_DROPOUT, **over})
    model = cls(cfg).to(device)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


SLOW = pytest.mark.slow  # kept out of the default run (make test-slow): CI time on CPU


def _backend(request, device):
    if request.param == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")
    return request.param


@pytest.fixture(params=["torch", "triton"])
def core_backend(request, device):
    """Both backends in the default run: the core parity tests (logits, loss, training)."""
    return _backend(request, device)


@pytest.fixture(params=["torch", pytest.param("triton", marks=SLOW)])
def backend(request, device):
    """torch in the default run, the Triton interpreter in the slow run."""
    return _backend(request, device)


def _pair(device, backend="torch", cls=GPT2LMHeadModel, **over):
    ref = _hf(device, cls, **over)
    fast = patch_hf(copy.deepcopy(ref), backend=backend)
    return ref, fast


def _close(a, b, name, atol=2e-5, rtol=1e-4):
    assert a is not None and b is not None, f"{name}: missing"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _grads_close(ref, fast, atol=2e-5):
    g_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        _close(p.grad, g_ref[name].grad, f"grad {name}", atol=atol)


def _ids(device, B=2, T=9):
    return torch.randint(1, V, (B, T), device=device)


# ---------------------------------------------------------------------------------------------
# what patch_hf changes
# ---------------------------------------------------------------------------------------------

def test_modules_are_swapped_weights_kept(device):
    ref, fast = _pair(device)
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


def test_backend_resolved_once_at_patch_time(monkeypatch):
    monkeypatch.setenv("GPT2_FAST_BACKEND", "torch")  # read by patch_hf, not per call
    fast = patch_hf(_hf("cpu"), backend="cpp")
    kernels = {m._gpt2_fast_ops for m in fast.modules() if hasattr(m, "_gpt2_fast_ops")}
    assert kernels == {ops.dispatch("torch")} and fast.transformer.ln_f._gpt2_fast_ops.backend == "torch"
    monkeypatch.setenv("GPT2_FAST_BACKEND", "bogus")  # no longer read: forward still runs
    fast(_ids("cpu"))
    monkeypatch.delenv("GPT2_FAST_BACKEND")
    patch_hf(fast, backend="cpp")  # patching again re-targets
    assert fast.transformer.h[0].mlp._gpt2_fast_ops.backend == "cpp"


def test_ops_are_called(device, monkeypatch):
    calls = {}
    table = ops.dispatch("torch")._table(device.type)
    for name, real in list(table.items()):
        def spy(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setitem(table, name, spy)
    _, fast = _pair(device)
    idx = _ids(device, 2, 8)
    fast.train()
    fast(idx, labels=idx).loss.backward()
    patch_hf(fast, backend="torch", skip_logits=True)
    fast(idx, labels=idx).loss.backward()
    assert calls == {"layer_norm": 2 * 3, "add_layer_norm": 2 * 2, "bias_gelu": 2 * 2, "attention": 2 * 2,
                     "softmax_cross_entropy": 1, "lm_head_cross_entropy": 1}, calls


# ---------------------------------------------------------------------------------------------
# forward, loss, training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T", [(2, 17), pytest.param(1, 1, marks=SLOW)])
def test_logits_and_eval_loss_match(device, core_backend, B, T):
    ref, fast = _pair(device, core_backend)
    ref.eval(), fast.eval()
    idx = torch.randint(0, V, (B, T), device=device)
    labels = idx.clone()
    if T > 2:
        labels[0, 3] = -100
        labels[1] = -100  # a row with no target at all
    out_ref, out_fast = ref(idx, labels=labels), fast(idx, labels=labels)
    _close(out_fast.logits, out_ref.logits, "logits")
    if T > 1:
        _close(out_fast.loss, out_ref.loss, "loss")
    else:  # one position: no target after the shift, NaN mean on both sides
        assert torch.isnan(out_fast.loss) and torch.isnan(out_ref.loss)


def test_training_step_matches_hf(device, core_backend):
    """Training with labels: the same loss, the real logits (by default) and every gradient."""
    ref, fast = _pair(device, core_backend)
    ref.train(), fast.train()
    idx = _ids(device, 2, 19)
    labels = idx.clone()
    labels[1, :4] = -100
    out_ref, out_fast = ref(idx, labels=labels), fast(idx, labels=labels)
    _close(out_fast.logits, out_ref.logits, "training logits (returned by default)")
    _close(out_fast.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out_fast.loss.backward()
    _grads_close(ref, fast)


def test_skip_logits_is_opt_in(device, backend):
    ref = _hf(device)
    fast = patch_hf(copy.deepcopy(ref), backend=backend, skip_logits=True)
    idx = _ids(device)
    out_ref, out_fast = ref(idx, labels=idx), fast(idx, labels=idx)
    assert out_fast.logits is None, "skip_logits=True: the fused LM-head loss, no logits"
    _close(out_fast.loss, out_ref.loss, "fused loss")
    out_ref.loss.backward()
    out_fast.loss.backward()
    _grads_close(ref, fast)
    assert fast(idx).logits is not None, "without labels the logits are computed"


def test_num_items_in_batch_and_tuple_output(device):
    ref, fast = _pair(device)
    idx = _ids(device)
    n = torch.tensor(40, device=device)
    _close(fast(idx, labels=idx, num_items_in_batch=n).loss, ref(idx, labels=idx, num_items_in_batch=n).loss,
           "loss with num_items_in_batch")
    fast.eval(), ref.eval()
    tup, tup_ref = fast(idx, labels=idx, return_dict=False), ref(idx, labels=idx, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(tup_ref)
    _close(tup[0], tup_ref[0], "tuple loss")
    _close(tup[1], tup_ref[1], "tuple logits")


@SLOW
def test_token_type_and_position_ids(device, backend):
    ref, fast = _pair(device, backend)
    ref.eval(), fast.eval()
    idx = _ids(device, 2, 7)
    tt = torch.randint(0, V, idx.shape, device=device)
    pos = torch.arange(3, 10, device=device).expand(2, 7)
    _close(fast(idx, token_type_ids=tt).logits, ref(idx, token_type_ids=tt).logits, "token_type_ids")
    _close(fast(idx, position_ids=pos).logits, ref(idx, position_ids=pos).logits, "position_ids")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_still_works(device):
    ref, fast = _pair(device)
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.train(), fast.train()
    idx = _ids(device)
    out_ref, out_fast = ref(idx, labels=idx), fast(idx, labels=idx)
    _close(out_fast.loss, out_ref.loss, "loss")
    out_ref.loss.backward()
    out_fast.loss.backward()
    _grads_close(ref, fast)


def test_cross_attention_blocks(device):
    ref, fast = _pair(device, add_cross_attention=True)
    ref.eval(), fast.eval()
    idx = _ids(device, 2, 6)
    enc = torch.randn(2, 5, 64, device=device)
    _close(fast(idx, encoder_hidden_states=enc).logits, ref(idx, encoder_hidden_states=enc).logits,
           "logits with cross-attention")


# ---------------------------------------------------------------------------------------------
# outputs, masks and caches
# ---------------------------------------------------------------------------------------------

def test_output_hidden_states_and_attentions(device):
    """output_attentions gets the real weights (the eager math), never an empty tuple."""
    ref, fast = _pair(device)
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    ref.eval(), fast.eval(), eager.eval()
    idx = _ids(device, 2, 7)
    out_ref = eager(idx, output_hidden_states=True, output_attentions=True)
    out = fast(idx, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    for i, (a, b) in enumerate(zip(out.hidden_states, out_ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, out_ref.attentions)):
        _close(a, b, f"attentions[{i}]")
    _close(out.logits, out_ref.logits, "logits with output_attentions")
    assert fast(idx).attentions is None


def test_explicit_eager_is_respected(device):
    ref = _hf(device, attn="eager")
    with pytest.warns(UserWarning, match="attn_implementation='eager' was chosen explicitly"):
        fast = patch_hf(copy.deepcopy(ref), backend="torch")
    assert fast.config._attn_implementation == "eager"
    assert isinstance(fast.transformer.ln_f, GPT2FastLayerNorm)  # the rest is patched
    ref.eval(), fast.eval()
    idx = _ids(device)
    out, out_ref = fast(idx, output_attentions=True), ref(idx, output_attentions=True)
    _close(out.logits, out_ref.logits, "logits")
    _close(out.attentions[1], out_ref.attentions[1], "attentions")


def test_left_padding_mask(device, backend):
    ref, fast = _pair(device, backend)
    ref.eval(), fast.eval()
    idx = _ids(device, 2, 7)
    mask = torch.ones_like(idx)
    mask[1, :3] = 0  # left padding on row 1: HF's SDPA path with the mask
    _close(fast(idx, attention_mask=mask).logits, ref(idx, attention_mask=mask).logits, "padded logits")
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(fast.generate(idx, **kw), ref.generate(idx, **kw))


def test_dynamic_cache_decoding(device, backend):
    from transformers import DynamicCache
    ref, fast = _pair(device, backend)
    ref.eval(), fast.eval()
    idx = _ids(device, 2, 8)
    with torch.no_grad():
        full = ref(idx).logits
        cache = DynamicCache(config=fast.config)
        first = fast(idx[:, :5], past_key_values=cache, use_cache=True)
        assert first.past_key_values is cache and cache.get_seq_length() == 5
        step = fast(idx[:, 5:6], past_key_values=cache, use_cache=True)  # one token
        rest = fast(idx[:, 6:], past_key_values=cache, use_cache=True)   # two tokens at once
    _close(torch.cat([first.logits, step.logits, rest.logits], 1), full, "cached logits == full forward")


@SLOW
def test_generate_greedy_static_cache_sampling_beam(device):
    ref, fast = _pair(device)
    ref.eval(), fast.eval()
    idx = _ids(device, 2, 5)
    runs = {"greedy": dict(do_sample=False),
            "static cache": dict(do_sample=False, cache_implementation="static"),
            "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
            "beam": dict(do_sample=False, num_beams=3)}
    for name, kw in runs.items():
        outs = []
        for model in (ref, fast):
            torch.manual_seed(5)
            with torch.no_grad():
                outs.append(model.generate(idx, max_new_tokens=6, **kw))
        assert torch.equal(outs[0], outs[1]), name


def test_assisted_decoding(device):
    ref, fast = _pair(device)
    draft_ref = _hf(device, n_layer=1)
    draft = patch_hf(copy.deepcopy(draft_ref), backend="torch")
    for m in (ref, fast, draft_ref, draft):
        m.eval()
    idx = _ids(device, 1, 5)
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = ref.generate(idx, **kw)
        # with output_attentions: HF indexes the attentions of each verification step
        out = fast.generate(idx, assistant_model=draft, output_attentions=True,
                            return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, want)
    assert len(out.attentions) > 0 and len(out.attentions[0]) == 2  # (steps) x (layers)


# ---------------------------------------------------------------------------------------------
# every GPT-2 head class
# ---------------------------------------------------------------------------------------------

def _head_inputs(cls, device):
    idx = _ids(device, 2, 6)
    if cls is hf.GPT2Model:
        return dict(input_ids=idx), lambda o: o.last_hidden_state.square().mean()
    if cls is hf.GPT2ForSequenceClassification:
        return dict(input_ids=idx, labels=torch.tensor([0, 1], device=device)), None
    if cls is hf.GPT2ForTokenClassification:
        return dict(input_ids=idx, labels=torch.randint(0, 2, idx.shape, device=device)), None
    if cls is hf.GPT2ForQuestionAnswering:
        return dict(input_ids=idx, start_positions=torch.tensor([1, 2], device=device),
                    end_positions=torch.tensor([3, 4], device=device)), None
    idx = idx.view(1, 2, 6)  # GPT2DoubleHeadsModel: (batch, choices, T)
    return dict(input_ids=idx, mc_token_ids=torch.tensor([[5, 4]], device=device), labels=idx,
                mc_labels=torch.tensor([1], device=device)), lambda o: o.loss + o.mc_loss


@pytest.mark.parametrize("cls", [hf.GPT2Model, pytest.param(hf.GPT2ForSequenceClassification, marks=SLOW),
                                 pytest.param(hf.GPT2ForTokenClassification, marks=SLOW),
                                 pytest.param(hf.GPT2ForQuestionAnswering, marks=SLOW),
                                 pytest.param(hf.GPT2DoubleHeadsModel, marks=SLOW)],
                         ids=lambda c: c.__name__)
def test_every_head_class(device, cls):
    ref, fast = _pair(device, cls=cls)
    assert isinstance(fast.transformer.ln_f if cls is not hf.GPT2Model else fast.ln_f, GPT2FastLayerNorm)
    kw, objective = _head_inputs(cls, device)
    objective = objective or (lambda o: o.loss)
    out_ref, out_fast = ref(**kw), fast(**kw)
    for key, value in out_ref.items():
        if isinstance(value, torch.Tensor):
            _close(out_fast[key], value, f"{cls.__name__}.{key}")
    objective(out_ref).backward()
    objective(out_fast).backward()
    _grads_close(ref, fast)


# ---------------------------------------------------------------------------------------------
# config options: honoured, or the module left to HF with a warning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over", [pytest.param(dict(scale_attn_by_inverse_layer_idx=True), marks=SLOW),
                                  pytest.param(dict(scale_attn_weights=False), marks=SLOW),
                                  pytest.param(dict(layer_norm_epsilon=1e-2), marks=SLOW),
                                  pytest.param(dict(n_inner=96), marks=SLOW),
                                  dict(reorder_and_upcast_attn=True, attn="eager-ref")],
                         ids=lambda d: next(iter(d)))
def test_config_options_honoured(device, over):
    over = dict(over)
    eager_ref = over.pop("attn", None) == "eager-ref"  # HF upcasts and reorders only in eager
    ref, fast = _pair(device, **over)
    if eager_ref:
        ref.set_attn_implementation("eager")
    assert fast.config._attn_implementation == "gpt2_fast"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # honoured: no warning
        patch_hf(fast, backend="torch")
    idx = _ids(device)
    out_ref, out_fast = ref(idx, labels=idx), fast(idx, labels=idx)
    _close(out_fast.logits, out_ref.logits, "logits")
    out_ref.loss.backward()
    out_fast.loss.backward()
    _grads_close(ref, fast)


def test_other_activation_keeps_hf_mlp(device):
    ref = _hf(device, activation_function="relu")
    with pytest.warns(UserWarning, match="activation_function='relu' is not tanh-GELU: GPT2MLP left unpatched"):
        model = patch_hf(copy.deepcopy(ref), backend="torch")
    assert type(model.transformer.h[0].mlp) is hf.GPT2MLP
    idx = _ids(device, 1, 5)
    _close(model(idx).logits, ref(idx).logits, "relu model logits")


@SLOW
def test_dropout_is_applied_where_hf_applies_it(device):
    """attn_pdrop goes to the attention kernel; resid/embd dropout stay HF's modules."""
    for over in (dict(attn_pdrop=0.5), dict(resid_pdrop=0.5), dict(embd_pdrop=0.5)):
        _, fast = _pair(device, **over)
        idx = _ids(device)
        fast.train()
        assert not torch.equal(fast(idx).logits, fast(idx).logits), over
        fast.eval()
        assert torch.equal(fast(idx).logits, fast(idx).logits), over


# ---------------------------------------------------------------------------------------------
# save, load, pickle, bad input
# ---------------------------------------------------------------------------------------------

def test_save_load_and_pickle(device, tmp_path):
    ref, fast = _pair(device)
    fast.eval()
    idx = _ids(device, 1, 6)
    want = fast(idx, labels=idx).loss
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    _close(again(idx, labels=idx).loss, want, "loss after torch.save/load")
    fast.save_pretrained(tmp_path)  # loads back as a plain HF model, same weights
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).to(device).eval()
    assert type(plain.transformer.ln_f) is torch.nn.LayerNorm
    assert plain.config._attn_implementation != "gpt2_fast"
    _close(plain(idx, labels=idx).loss, want, "loss of the saved checkpoint")
    repatched = patch_hf(plain, backend="torch")
    _close(repatched(idx, labels=idx).loss, want, "loss of the saved checkpoint, patched again")


def test_bad_inputs():
    with pytest.raises(TypeError, match="expects a transformers GPT-2 model"):
        patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_hf(_hf(torch.device("cpu")), backend="tpu")

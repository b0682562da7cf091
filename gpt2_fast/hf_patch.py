"""patch_hf: swap a transformers GPT-2's LayerNorms, bias+GELU, attention and loss for gpt2_fast ops.

    from transformers import GPT2LMHeadModel
    import gpt2_fast
    model = GPT2LMHeadModel.from_pretrained("gpt2").cuda()
    gpt2_fast.patch_hf(model)              # in place; weights untouched; returns the model

Any GPT-2 model class works (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel,
GPT2ForSequenceClassification, GPT2ForTokenClassification, GPT2ForQuestionAnswering): its GPT2Model
(`model.transformer`) is patched; the LM-head loss only in GPT2LMHeadModel. Liger-Kernel's
apply_liger_kernel_to_* is the peer. The backend is resolved once, here (`ops.dispatch(backend)`,
GPT2_FAST_BACKEND read now): the patched forward does no look-ups, so torch.compile(fullgraph=True)
traces a training step whole.

  ln_1, ln_2, ln_f (every 1-D nn.LayerNorm)   -> ops layer_norm (class swapped in place)
  GPT2MLP: c_fc's bias + tanh-GELU            -> x @ W_fc, then ops bias_gelu(., b_fc); other
                                                 activation functions keep HF's MLP (a warning)
  GPT2Block `x = x + attn(ln_1(x)); h = ln_2(x)` -> ops add_layer_norm (one pass writes x and h);
                                                 cross-attention blocks keep HF's forward
  attention softmax(QK^T)V                    -> ops attention, as HF attention implementation
                                                 "gpt2_fast" (its scaling: scale_attn_weights,
                                                 scale_attn_by_inverse_layer_idx; attn_pdrop;
                                                 scores and softmax in fp32 on every backend, what
                                                 reorder_and_upcast_attn asks). Only when the model
                                                 uses HF's default "sdpa": an explicit "eager" (or
                                                 any other) choice is kept, with a warning. Calls
                                                 with a padding mask (or StaticCache slots) go to
                                                 HF's SDPA function; calls that ask for attention
                                                 weights (output_attentions) to the eager math.
  GPT2LMHeadModel loss (labels given)         -> ops softmax_cross_entropy on the logits; with
                                                 skip_logits=True (opt-in) the fused
                                                 lm_head_cross_entropy instead, and logits=None
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import BACKENDS

ATTN_IMPLEMENTATION = "gpt2_fast"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))
REPLACEABLE_ATTENTION = ("sdpa", ATTN_IMPLEMENTATION)  # HF's default for GPT-2, or ours already
HEAD_CLASSES = ("GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
                "GPT2ForTokenClassification", "GPT2ForQuestionAnswering")

# transformers objects the patched forwards use, filled by patch_hf (transformers is imported only
# then): a dict read in the forward, never an import.
_HF: dict = {}


class GPT2FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward is gpt2_fast's layer_norm (same parameters and state dict)."""

    _gpt2_fast_ops: Optional[ops.Kernels] = None  # set by patch_hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gpt2_fast_ops.layer_norm(x, self.weight, self.bias, self.eps)


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    h = torch.matmul(hidden_states, self.c_fc.weight)                   # Conv1D weight is (in, out)
    h = self._gpt2_fast_ops.bias_gelu(h, self.c_fc.bias)
    return self.dropout(self.c_proj(h))


def _block_forward(self, hidden_states, past_key_values=None, attention_mask=None,
                   encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
    """GPT2Block.forward with `x = x + attn(ln_1(x)); h = ln_2(x)` as one add_layer_norm."""
    if encoder_hidden_states is not None:  # cross-attention blocks keep HF's forward
        return self._hf_forward(
            hidden_states, past_key_values=past_key_values, attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache, **kwargs)
    residual = hidden_states
    attn_output, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values,
                               attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    ln_2 = self.ln_2
    hidden_states, h = self._gpt2_fast_ops.add_layer_norm(attn_output, residual, ln_2.weight,
                                                          ln_2.bias, ln_2.eps)
    return hidden_states + self.mlp(h)


_FAST_CLASSES: dict = {}
_FORWARDS = {"GPT2MLP": _mlp_forward, "GPT2Block": _block_forward}


def _fast_class(cls):
    """Subclass "Fast<cls>" of an HF module class with our forward (one per class; swapped in place).

    Made on first use (transformers is imported only then) and published as a module attribute,
    so pickling a patched model works; module __getattr__ rebuilds it when unpickling. A subclass
    of GPT2Block keeps HF's gradient checkpointing (GradientCheckpointingLayer wraps its forward)
    and HF's output_hidden_states hooks (they match GPT2Block instances).
    """
    if cls not in _FAST_CLASSES:
        name = "Fast" + cls.__name__
        fast = type(name, (cls,), {"forward": _FORWARDS[cls.__name__], "_hf_forward": cls.forward,
                                   "__module__": __name__, "__qualname__": name})
        _FAST_CLASSES[cls] = fast
        globals()[name] = fast
    return _FAST_CLASSES[cls]


def __getattr__(name: str):
    if name in ("FastGPT2MLP", "FastGPT2Block"):
        from transformers.models.gpt2 import modeling_gpt2
        return _fast_class(getattr(modeling_gpt2, name[len("Fast"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# attention: the HF attention-interface function "gpt2_fast"
# ---------------------------------------------------------------------------------------------

def _weights_requested(module: nn.Module) -> bool:
    """True when this forward records attention weights (output_attentions=True): HF collects them
    with hooks into a context variable that is torch.compile-safe (transformers' own design)."""
    collector = _HF.get("collector")
    collected = collector.get() if collector is not None else None
    if not collected:
        return False
    return ("cross_attentions" if getattr(module, "is_cross_attention", False) else "attentions") in collected


def _attention_with_weights(module, query, key, value, attention_mask, scaling, dropout):
    """The eager math, returning the weights: ((B, Tq, H, D), (B, H, Tq, Tk)). Scores and softmax
    in fp32; a boolean mask (True = attend) or an additive one; no mask means causal if the module is."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    lowest = torch.finfo(s.dtype).min  # as HF's eager masks: a fully masked row gives uniform, not NaN
    if attention_mask is not None:
        s = s.masked_fill(~attention_mask, lowest) if attention_mask.dtype == torch.bool else s + attention_mask
    elif getattr(module, "is_causal", True):
        Tq, Tk = s.shape[-2:]
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).tril(Tk - Tq)
        s = s.masked_fill(~keep, lowest)
    weights = torch.softmax(s, dim=-1).to(value.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, value).transpose(1, 2), weights


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs):
    """HF attention-interface function: q, k, v (B, H, T, D) -> ((B, T, H, D), weights or None).

    With no mask (HF's mask builder, the SDPA one, drops it when the attention is purely causal
    or sees every key) this is the ops attention, causal aligned bottom-right so decoding against a
    cache works; a real padding mask goes to transformers' own SDPA function; a call that records
    attention weights computes them (the kernels never form them).
    """
    if _weights_requested(module):
        return _attention_with_weights(module, query, key, value, attention_mask, scaling, dropout)
    if attention_mask is not None:
        return _HF["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, **kwargs)
    kernels = getattr(module, "_gpt2_fast_ops", None) or ops.dispatch("auto")
    out = kernels.attention(query, key, value, causal=getattr(module, "is_causal", True),
                            dropout_p=dropout, scale=scaling)           # (B, H, T, D)
    return out.transpose(1, 2), None


def _load_transformers() -> None:
    """Fill _HF and register the attention implementation (idempotent)."""
    if _HF:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions: weights never requested
        _active_collector = None
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _HF.update(sdpa=sdpa_attention_forward, lm_output=CausalLMOutputWithCrossAttentions,
               collector=_active_collector)


# ---------------------------------------------------------------------------------------------
# GPT2LMHeadModel.forward with the loss through gpt2_fast
# ---------------------------------------------------------------------------------------------

def _lm_head_model_forward(self, input_ids=None, past_key_values=None, attention_mask=None,
                           token_type_ids=None, position_ids=None, inputs_embeds=None,
                           encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                           use_cache=None, logits_to_keep=0, **kwargs):
    """GPT2LMHeadModel.forward with the loss through gpt2_fast (same arguments and outputs)."""
    return_dict = kwargs.pop("return_dict", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    out = self.transformer(
        input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
        token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
        use_cache=use_cache, return_dict=True, **kwargs)
    hidden = out.last_hidden_state                                      # (B, T, C)
    kernels = self._gpt2_fast_ops
    V = self.config.vocab_size
    if shift_labels is None and labels is not None:
        # tokens < n predict n: the last position has no target
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = logits = None
    if shift_labels is not None and self._gpt2_fast_skip_logits:
        targets = shift_labels.reshape(-1).to(hidden.device)
        loss = kernels.lm_head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                             targets, ignore_index, V)
    else:
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep, :]
        logits = self.lm_head(kept)                                     # (B, T, V)
        if shift_labels is not None:
            targets = shift_labels.reshape(-1).to(logits.device)
            loss = kernels.softmax_cross_entropy(logits.reshape(-1, V), targets, ignore_index)
    if loss is not None and num_items_in_batch is not None:
        # HF's gradient-accumulation convention: sum over this batch / items over all micro-batches
        n_valid = (targets != ignore_index).sum()
        loss = torch.nan_to_num(loss) * n_valid / torch.as_tensor(num_items_in_batch).to(loss.device)
    result = _HF["lm_output"](
        loss=loss, logits=logits, past_key_values=out.past_key_values,
        hidden_states=out.hidden_states, attentions=out.attentions,
        cross_attentions=getattr(out, "cross_attentions", None))
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return result.to_tuple()
    return result


# ---------------------------------------------------------------------------------------------
# patch_hf
# ---------------------------------------------------------------------------------------------

def _base_model(model: nn.Module, hf) -> nn.Module:
    """The GPT2Model inside `model` (or model itself); TypeError for anything else."""
    base = model if isinstance(model, hf.GPT2Model) else getattr(model, "transformer", None)
    if not isinstance(model, hf.GPT2PreTrainedModel) or not isinstance(base, hf.GPT2Model):
        raise TypeError(f"patch_hf expects a transformers GPT-2 model ({', '.join(HEAD_CLASSES)}), "
                        f"got {type(model).__name__}")
    return base


def _patch_attention(model: nn.Module) -> bool:
    """Switch to attention implementation "gpt2_fast" unless another one was chosen explicitly."""
    current = getattr(model.config, "_attn_implementation", None)
    if current not in (None,) + REPLACEABLE_ATTENTION:
        warnings.warn(f"patch_hf: attn_implementation={current!r} was chosen explicitly: attention left "
                      f"as is (call model.set_attn_implementation('sdpa') before patch_hf to use "
                      f"gpt2_fast's)", UserWarning, stacklevel=3)
        return False
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    return True


def patch_hf(model: nn.Module, backend: str = "auto", layer_norm: bool = True, mlp: bool = True,
             attention: bool = True, loss: bool = True, fuse_residual: bool = True,
             skip_logits: bool = False) -> nn.Module:
    """Swap, in place, a transformers GPT-2 model's ops for gpt2_fast's; returns the model.

    model: GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification,
    GPT2ForTokenClassification or GPT2ForQuestionAnswering. backend: "auto" | "torch" | "triton" |
    "cuda" | "cpp", as gpt2_fast.ops, resolved now (GPT2_FAST_BACKEND, when set, overrides it now;
    call patch_hf again to re-target). skip_logits (opt-in, GPT2LMHeadModel): with labels, compute
    the loss with the LM head fused in and return logits=None (the (B*T, V) logits never exist).
    fuse_residual: each block's `x = x + attn(...); h = ln_2(x)` becomes one add_layer_norm (needs
    layer_norm). Weights, parameter names and the state dict are unchanged. What cannot be
    computed the same way is left to HF with a one-line warning (see the module docstring).
    """
    try:
        from transformers.models.gpt2 import modeling_gpt2 as hf
    except Exception as e:  # pragma: no cover - transformers is a test/extra dependency
        raise ImportError(f"patch_hf needs transformers ({type(e).__name__}: {e})") from e
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    base = _base_model(model, hf)
    _load_transformers()
    kernels = ops.dispatch(backend)
    act = getattr(model.config, "activation_function", "gelu_new")
    if mlp and act not in TANH_GELUS:
        warnings.warn(f"patch_hf: activation_function={act!r} is not tanh-GELU: GPT2MLP left unpatched",
                      UserWarning, stacklevel=2)
    for module in base.modules():
        if layer_norm and type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            module.__class__ = GPT2FastLayerNorm
        if mlp and type(module) is hf.GPT2MLP and act in TANH_GELUS:
            module.__class__ = _fast_class(hf.GPT2MLP)
        if fuse_residual and layer_norm and type(module) is hf.GPT2Block and \
                type(module.ln_2) in (nn.LayerNorm, GPT2FastLayerNorm) and \
                len(module.ln_2.normalized_shape) == 1:  # (a block comes before its ln_2 here)
            module.__class__ = _fast_class(hf.GPT2Block)
        if isinstance(module, (GPT2FastLayerNorm, hf.GPT2Attention)) or \
                type(module) in _FAST_CLASSES.values():
            module._gpt2_fast_ops = kernels
    if attention:
        _patch_attention(model)
    if loss and isinstance(model, hf.GPT2LMHeadModel):
        model._gpt2_fast_ops = kernels
        model._gpt2_fast_skip_logits = bool(skip_logits)
        # a partial, not a bound method, so that deepcopy and pickling of the model still work
        model.forward = functools.partial(_lm_head_model_forward, model)
    return model

"""patch_hf: swap a transformers GPT-2's LayerNorms, bias+GELU, attention and loss for gpt2_fast ops.

    from transformers import GPT2LMHeadModel
    import gpt2_fast
    model = GPT2LMHeadModel.from_pretrained("gpt2").cuda()
    gpt2_fast.patch_hf(model)              # in place; weights untouched; returns the model

What changes (Liger-Kernel's apply_liger_kernel_to_* is the peer), each through gpt2_fast.ops so
the backend follows its rules ("auto": Triton on CUDA, else the best CPU path; or backend=...):

  ln_1, ln_2, ln_f (every 1-D nn.LayerNorm)   -> ops.layer_norm            (class swapped in place)
  GPT2MLP: c_fc's bias + tanh-GELU            -> x @ W_fc, then ops.bias_gelu(., b_fc)
  GPT2Attention core softmax(QK^T)V           -> ops.attention, registered as HF attention
                                                 implementation "gpt2_fast"; calls that carry a
                                                 padding mask go to HF's own SDPA path unchanged
  GPT2LMHeadModel loss (labels given)         -> in training, ops.lm_head_cross_entropy: the LM
                                                 head fused with the loss, logits returned as
                                                 None (the (B*T, V) logits never exist); else the
                                                 logits are computed and ops.softmax_cross_entropy
                                                 gives the loss
  GPT2Block `x = x + attn(ln_1(x)); h = ln_2(x)` -> ops.add_layer_norm (one pass writes x and h);
                                                 cross-attention blocks keep HF's forward
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import BACKENDS

ATTN_IMPLEMENTATION = "gpt2_fast"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))


class GPT2FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward is gpt2_fast.ops.layer_norm (same parameters and state dict)."""

    _gpt2_fast_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self._gpt2_fast_backend)


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    h = torch.matmul(hidden_states, self.c_fc.weight)                   # Conv1D weight is (in, out)
    h = ops.bias_gelu(h, self.c_fc.bias, backend=self._gpt2_fast_backend)
    return self.dropout(self.c_proj(h))


def _block_forward(self, hidden_states, past_key_values=None, attention_mask=None,
                   encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
    """GPT2Block.forward with `x = x + attn(ln_1(x)); h = ln_2(x)` as one ops.add_layer_norm."""
    if encoder_hidden_states is not None:  # cross-attention blocks keep HF's forward
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        return GPT2Block.forward(
            self, hidden_states, past_key_values=past_key_values, attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache, **kwargs)
    residual = hidden_states
    attn_output, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values,
                               attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    ln_2 = self.ln_2
    hidden_states, h = ops.add_layer_norm(attn_output, residual, ln_2.weight, ln_2.bias, ln_2.eps,
                                          backend=self._gpt2_fast_backend)
    return hidden_states + self.mlp(h)


_FAST_CLASSES: dict = {}
_FORWARDS = {"GPT2MLP": _mlp_forward, "GPT2Block": _block_forward}


def _fast_class(cls):
    """Subclass "Fast<cls>" of an HF module class with our forward (one per class; swapped in place).

    Made on first use (transformers is imported only then) and published as a module attribute,
    so pickling a patched model works; module __getattr__ rebuilds it when unpickling. A subclass
    of GPT2Block keeps HF's gradient checkpointing (GradientCheckpointingLayer wraps its forward).
    """
    if cls not in _FAST_CLASSES:
        name = "Fast" + cls.__name__
        fast = type(name, (cls,), {"forward": _FORWARDS[cls.__name__], "_gpt2_fast_backend": "auto",
                                   "__module__": __name__, "__qualname__": name})
        _FAST_CLASSES[cls] = fast
        globals()[name] = fast
    return _FAST_CLASSES[cls]


def __getattr__(name: str):
    if name in ("FastGPT2MLP", "FastGPT2Block"):
        from transformers.models.gpt2 import modeling_gpt2
        return _fast_class(getattr(modeling_gpt2, name[len("Fast"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs):
    """HF attention-interface function: q, k, v (B, H, T, D) -> ((B, T, H, D), None).

    With no mask (HF's mask builder, the SDPA one, drops it when the attention is purely causal
    or sees every key) this is ops.attention, causal aligned bottom-right so decoding against a
    cache works; a real padding mask goes to transformers' own SDPA function.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    causal = bool(getattr(module, "is_causal", True))
    out = ops.attention(query, key, value, causal=causal, dropout_p=dropout, scale=scaling,
                        backend=getattr(module, "_gpt2_fast_backend", "auto"))  # (B, H, T, D)
    return out.transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _lm_head_model_forward(self, input_ids=None, past_key_values=None, attention_mask=None,
                           token_type_ids=None, position_ids=None, inputs_embeds=None,
                           encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                           use_cache=None, logits_to_keep=0, **kwargs):
    """GPT2LMHeadModel.forward with the loss through gpt2_fast (same arguments and outputs)."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
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
    backend = self._gpt2_fast_backend
    V = self.config.vocab_size
    if shift_labels is None and labels is not None:
        # tokens < n predict n: the last position has no target
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    skip_logits = self._gpt2_fast_skip_logits
    skip_logits = self.training if skip_logits is None else skip_logits
    loss = logits = None
    if shift_labels is not None and skip_logits:
        targets = shift_labels.reshape(-1).to(hidden.device)
        loss = ops.lm_head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                         targets, ignore_index, V, backend=backend)
    else:
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep, :]
        logits = self.lm_head(kept)                                     # (B, T, V)
        if shift_labels is not None:
            targets = shift_labels.reshape(-1).to(logits.device)
            loss = ops.softmax_cross_entropy(logits.reshape(-1, V), targets, ignore_index,
                                             backend=backend)
    if loss is not None and num_items_in_batch is not None:
        # HF's gradient-accumulation convention: sum over this batch / items over all micro-batches
        n_valid = (targets != ignore_index).sum()
        loss = torch.nan_to_num(loss) * n_valid / torch.as_tensor(num_items_in_batch).to(loss.device)
    result = CausalLMOutputWithCrossAttentions(
        loss=loss, logits=logits, past_key_values=out.past_key_values,
        hidden_states=out.hidden_states, attentions=out.attentions,
        cross_attentions=getattr(out, "cross_attentions", None))
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return result.to_tuple()
    return result


def patch_hf(model: nn.Module, backend: str = "auto", layer_norm: bool = True, mlp: bool = True,
             attention: bool = True, loss: bool = True, fuse_residual: bool = True,
             skip_logits: Optional[bool] = None) -> nn.Module:
    """Swap, in place, a transformers GPT2LMHeadModel's (or GPT2Model's) ops for gpt2_fast's.

    backend: "auto" | "torch" | "triton" | "cuda" | "cpp", as gpt2_fast.ops (GPT2_FAST_BACKEND
    still overrides). skip_logits: with labels, return logits=None and use the fused LM-head loss;
    None means "when model.training" (Liger's default). fuse_residual: each block's
    `x = x + attn(...); h = ln_2(x)` becomes one add_layer_norm (needs layer_norm). Weights, parameter names and the state
    dict are unchanged. Calling patch_hf again re-targets the backend. Returns the model.
    """
    try:
        from transformers.models.gpt2 import modeling_gpt2 as hf
    except Exception as e:  # pragma: no cover - transformers is a test/extra dependency
        raise ImportError(f"patch_hf needs transformers ({type(e).__name__}: {e})") from e
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, (hf.GPT2LMHeadModel, hf.GPT2Model)):
        raise TypeError(f"patch_hf expects a transformers GPT2LMHeadModel or GPT2Model, "
                        f"got {type(model).__name__}")
    act = getattr(model.config, "activation_function", "gelu_new")
    for module in model.modules():
        if layer_norm and type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            module.__class__ = GPT2FastLayerNorm
        if mlp and type(module) is hf.GPT2MLP and act in TANH_GELUS:
            module.__class__ = _fast_class(hf.GPT2MLP)
        if fuse_residual and layer_norm and type(module) is hf.GPT2Block and \
                type(module.ln_2) in (nn.LayerNorm, GPT2FastLayerNorm) and \
                len(module.ln_2.normalized_shape) == 1:
            module.__class__ = _fast_class(hf.GPT2Block)
        if isinstance(module, (GPT2FastLayerNorm, hf.GPT2Attention)) or \
                type(module) in _FAST_CLASSES.values():
            module._gpt2_fast_backend = backend
    if attention:
        _register_attention()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        else:  # pragma: no cover - older transformers
            model.config._attn_implementation = ATTN_IMPLEMENTATION
    if loss and isinstance(model, hf.GPT2LMHeadModel):
        model._gpt2_fast_backend = backend
        model._gpt2_fast_skip_logits = skip_logits
        # a partial, not a bound method, so that deepcopy and pickling of the model still work
        model.forward = functools.partial(_lm_head_model_forward, model)
    return model

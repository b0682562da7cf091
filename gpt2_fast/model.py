"""GPT-2 (Radford et al. 2019) in one file: the same module trains, prefills and decodes.

Pre-LayerNorm blocks, a final LayerNorm, tanh-GELU MLP of 4d, learned positions, lm_head tied
to wte. Parameter names are HF's / nanoGPT's (`transformer.wte`, `transformer.h.0.attn.c_attn`,
...), with nn.Linear (out, in) weights where HF's Conv1D stores (in, out): gpt2_fast/hf.py
transposes those four on load and save. Every fused op goes through gpt2_fast/ops.py: each module
holds `self.kernels = ops.dispatch(backend)`, resolved at construction and by set_backend, so a
forward does no look-ups and torch.compile(fullgraph=True) traces it whole.

forward(idx, targets=None, input_pos=None, kv_start=None):
  input_pos None  -> training / full forward (causal flash attention over idx).
  input_pos (T,)  -> cached: k, v are written to the static cache at input_pos (contiguous,
                     increasing positions) and the T queries attend over the cache (prefill
                     when T > 1, decode when T == 1). `setup_cache` first.
  kv_start (B,)   -> left padding: the first kv_start[b] cache slots of row b are padding;
                     token positions count from there.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .config import GPTConfig


class KVCache(nn.Module):
    """Static (B_max, H, S_max, D) key and value buffers, gpt-fast style: shapes never change."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at slots input_pos (T,); return the caches' first B rows."""
        B = k.shape[0]
        k_cache, v_cache = self.k_cache[:B], self.v_cache[:B]
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        return k_cache, v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.backend, self.kernels = config.backend, ops.dispatch(config.backend)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, input_pos: Optional[Tensor] = None,
                kv_start: Optional[Tensor] = None, live: Optional[int] = None,
                fresh: bool = False) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is None:
            p = self.dropout if self.training else 0.0
            y = self.kernels.attention(q, k, v, causal=True, dropout_p=p)
        else:
            k_cache, v_cache = self.kv_cache.update(input_pos, k, v)      # (B, nh, S, hs)
            if fresh:  # prefill of an empty, unpadded cache: plain causal attention over the prompt
                y = self.kernels.attention(q, k, v, causal=True)
            else:
                if live is not None:  # the host knows the live length: never touch slots past it
                    k_cache, v_cache = k_cache[:, :, :live], v_cache[:, :, :live]
                kv_len = (input_pos[-1:] + 1).to(torch.int32).expand(B)  # (B,)
                y = self.kernels.decode_attention(q, k_cache, v_cache, kv_len, kv_start)
        y = y.transpose(1, 2).reshape(B, T, C)                           # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def matmul_no_bias(linear: nn.Module, x: Tensor) -> Tensor:
    """x @ W^T of an nn.Linear (or a quantized twin with a `matmul` method), bias left out."""
    matmul = getattr(linear, "matmul", None)
    return matmul(x) if matmul is not None else F.linear(x, linear.weight)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.backend, self.kernels = config.backend, ops.dispatch(config.backend)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.kernels.bias_gelu(matmul_no_bias(self.c_fc, x), self.c_fc.bias)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.eps, self.backend = config.layer_norm_epsilon, config.backend
        self.kernels = ops.dispatch(config.backend)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, input_pos: Optional[Tensor] = None,
                kv_start: Optional[Tensor] = None, live: Optional[int] = None,
                fresh: bool = False) -> Tensor:
        h = self.kernels.layer_norm(x, self.ln_1.weight, self.ln_1.bias, self.eps)
        a = self.attn(h, input_pos, kv_start, live, fresh)
        # x = x + attn(ln_1(x)); h = ln_2(x), with the residual add fused into the LayerNorm
        x, h = self.kernels.add_layer_norm(x, a, self.ln_2.weight, self.ln_2.bias, self.eps)
        return x + self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.backend, self.kernels = config.backend, ops.dispatch(config.backend)  # see set_backend
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_rows, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied
        self.max_batch_size = self.max_seq_len = -1
        self.grad_checkpointing = False  # set by training (--grad_checkpointing); see _hidden
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- construction ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """normal(0, 0.02) weights, zero biases, residual projections 0.02/sqrt(2 n_layer)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    @classmethod
    def from_pretrained(cls, path_or_name: str, dtype: Optional[torch.dtype] = None,
                        device=None, **config_overrides) -> "GPT":
        """Load an HF GPT-2 checkpoint directory, or a preset name through the HF hub."""
        from .hf import load_pretrained
        return load_pretrained(cls, path_or_name, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, directory: str) -> None:
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel loads."""
        from .hf import save_pretrained
        save_pretrained(self, directory)

    def set_backend(self, backend: str) -> "GPT":
        """Switch every fused op of this model to `backend` (see gpt2_fast.ops)."""
        GPTConfig(backend=backend)  # validates the name
        self.config.backend = backend
        kernels = ops.dispatch(backend)  # resolved here, once: forward passes do no look-ups
        for m in self.modules():
            if hasattr(m, "kernels"):
                m.backend, m.kernels = backend, kernels
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -- KV cache ---------------------------------------------------------------------------

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None, device=None) -> None:
        """Allocate the static KV caches (max_batch_size, n_head, max_seq_len, head_dim)."""
        cfg = self.config
        max_seq_len = cfg.block_size if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= cfg.block_size:
            raise ValueError(f"max_seq_len must be in [1, block_size={cfg.block_size}], got {max_seq_len}")
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        param = self.transformer.wte.weight
        dtype = param.dtype if dtype is None else dtype
        device = param.device if device is None else device
        if (self.max_batch_size, self.max_seq_len) == (max_batch_size, max_seq_len) and \
                self.transformer.h[0].attn.kv_cache.k_cache.dtype == dtype and \
                self.transformer.h[0].attn.kv_cache.k_cache.device == torch.device(device):
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch_size, max_seq_len, cfg.n_head, cfg.head_dim,
                                          dtype, device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.max_batch_size = self.max_seq_len = -1

    # -- forward ----------------------------------------------------------------------------

    def _check_inputs(self, idx: Tensor, targets: Optional[Tensor], input_pos: Optional[Tensor],
                      kv_start: Optional[Tensor]) -> None:
        cfg = self.config
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an int64 tensor of shape (B, T); got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        if idx.device != self.transformer.wte.weight.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.transformer.wte.weight.device}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if input_pos is not None:
            if self.max_seq_len < 0:
                raise RuntimeError("input_pos given but no KV cache: call model.setup_cache(...) first")
            if input_pos.shape != (T,):
                raise ValueError(f"input_pos must have shape (T,) = ({T},), got {tuple(input_pos.shape)}")
            if B > self.max_batch_size:
                raise ValueError(f"batch {B} exceeds the cache's max_batch_size {self.max_batch_size}")
        if kv_start is not None and kv_start.shape != (B,):
            raise ValueError(f"kv_start must have shape (B,) = ({B},), got {tuple(kv_start.shape)}")
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or torch.compiler.is_compiling() or (idx.is_cuda and self.training):
            return  # value checks would sync with the host (on CUDA: once per training step)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got min {int(idx.min())}, "
                             f"max {int(idx.max())}")
        if input_pos is not None and int(input_pos[-1]) >= self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {int(input_pos[-1])} does not fit the cache "
                             f"of max_seq_len {self.max_seq_len}")

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                input_pos: Optional[Tensor] = None, kv_start: Optional[Tensor] = None,
                only_last: bool = False, return_logits: bool = True):
        """Returns (logits, loss).

        idx (B, T) token ids; targets (B, T) with -100 ignored, or None (loss None).
        logits (B, T, vocab_size) (or (B, 1, vocab_size) with only_last). With targets and
        return_logits=False the LM head is fused with the loss and logits is None: the
        (B*T, vocab) logits are never materialized (what training wants).
        """
        self._check_inputs(idx, targets, input_pos, kv_start)
        B, T = idx.shape
        x = self._hidden(idx, input_pos, kv_start)                      # (B, T, C)
        V = self.config.vocab_size
        if targets is not None and not return_logits:
            loss = self.kernels.lm_head_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight,
                                                      targets.reshape(-1), -100, V)
            return None, loss
        if only_last:
            x = x[:, -1:, :]
        logits = self.lm_head(x)[..., :V]                               # (B, T, V)
        loss = None
        if targets is not None:
            loss = self.kernels.softmax_cross_entropy(logits.reshape(-1, V), targets.reshape(-1), -100)
        return logits, loss

    def forward_cached(self, idx: Tensor, input_pos: Tensor, kv_start: Optional[Tensor] = None,
                       live: Optional[int] = None, fresh: bool = False,
                       only_last: bool = True) -> Tensor:
        """Cached forward without value checks (no host sync): logits (B, 1 or T, vocab_size).

        The caller guarantees what forward() would check: ids in range, input_pos (T,) contiguous
        slots inside the cache, B <= max_batch_size. live: attend over cache slots [0, live) only
        (>= input_pos[-1] + 1); fresh: input_pos is arange(T) and kv_start is None.
        """
        x = self._hidden(idx, input_pos, kv_start, live, fresh)
        if only_last:
            x = x[:, -1:, :]
        return self.lm_head(x)[..., :self.config.vocab_size]

    def _hidden(self, idx: Tensor, input_pos: Optional[Tensor], kv_start: Optional[Tensor],
                live: Optional[int] = None, fresh: bool = False) -> Tensor:
        """Embeddings, the blocks and the final LayerNorm: (B, T) ids -> (B, T, C)."""
        T = idx.shape[1]
        if input_pos is None:
            pos = torch.arange(T, device=idx.device)                    # (T,)
        else:
            pos = input_pos
        if kv_start is not None:
            pos = (pos[None, :] - kv_start[:, None]).clamp_min(0)        # (B, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)       # (B, T, C)
        x = self.transformer.drop(x)
        recompute = self.grad_checkpointing and input_pos is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:  # activation checkpointing: the block's activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, input_pos, kv_start, live, fresh)
        ln_f = self.transformer.ln_f
        return self.kernels.layer_norm(x, ln_f.weight, ln_f.bias, self.config.layer_norm_epsilon)

"""GPTConfig: the model's shape and the kernel backend, with the four GPT-2 presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

# Radford et al. 2019, Table 2 (the 117M model is 124M with the tied embedding counted once).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257          # the real vocabulary: logits and sampling cover exactly this
    block_size: int = 1024           # context length (number of learned positions)
    dropout: float = 0.0             # embedding, attention-probability and residual dropout
    bias: bool = True                # biases in Linear layers and LayerNorms, as GPT-2
    layer_norm_epsilon: float = 1e-5
    backend: str = "auto"            # kernel backend for the fused ops: see gpt2_fast.ops
    padded_vocab_size: Optional[int] = None  # e.g. 50304: embedding rows padded for matmul speed

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GPTConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPTConfig.padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
                f"({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def embedding_rows(self) -> int:
        """Rows of wte / lm_head: the padded vocabulary when one is set."""
        return self.padded_vocab_size or self.vocab_size

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by its exact name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; expected some of {sorted(names)}")
        return cls(**d)

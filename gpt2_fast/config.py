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
    tie_word_embeddings: bool = True  # lm_head shares wte's weight (GPT-2); False: its own weight

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


# Fields of TrainConfig that only steer a run (where it writes, how often it logs): they may
# differ when a run is resumed. Every other field must match the checkpoint's.
RUN_CONTROL_FIELDS = ("out_dir", "resume", "device", "compile", "eval_interval", "eval_iters",
                      "log_interval", "sample_interval", "sample_tokens", "sample_prompt",
                      "ckpt_interval", "keep_last", "progress", "tensorboard", "plot", "init_from",
                      "max_steps_this_run", "max_seconds")


@dataclass
class TrainConfig:
    """Everything `gpt2-fast train` needs; a TOML/JSON file and --key=value set these fields."""
    # model: a preset, with optional shape overrides (None keeps the preset's value)
    model: str = "gpt2"
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None
    dropout: float = 0.0
    backend: str = "auto"
    padded_vocab_size: Optional[int] = None
    init_from: str = "scratch"          # "scratch", an HF checkpoint directory, or our .pt checkpoint
    # data
    data: str = "out/data"              # a `gpt2-fast prepare` folder (or a glob of shards)
    data_order: str = "random"          # "random" or "sequential"
    batch_size: int = 8                 # B per process and micro-step
    seq_len: int = 1024                 # T (<= the model's block_size)
    grad_accum: int = 1                 # micro-steps per optimizer step
    # optimization: AdamW, linear warmup then cosine decay to min_lr
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0 disables clipping
    dtype: str = "auto"                 # "auto" (bf16 autocast on CUDA, fp32 on CPU), "float32", "bfloat16"
    seed: int = 1337
    fsdp: bool = False                  # FSDP2 fully_shard (under torchrun) instead of DDP
    # run control (may change on --resume)
    out_dir: str = "out/train"
    resume: str = ""                    # "", "auto" (latest in out_dir) or a checkpoint path
    device: str = ""                    # "" = cuda if available else cpu
    compile: bool = False
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_interval: int = 0            # 0: no samples during training
    sample_tokens: int = 64
    sample_prompt: str = ""
    ckpt_interval: int = 500
    keep_last: int = 3
    max_steps_this_run: int = 0         # stop (with a checkpoint) after this many steps; 0: no limit
    max_seconds: float = 0.0            # stop (with a final eval and checkpoint) after this much wall time; 0: no limit
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_iters", "log_interval",
                     "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "eval_interval", "sample_interval", "ckpt_interval",
                     "max_steps_this_run", "sample_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.max_seconds, (int, float)) or self.max_seconds < 0:
            raise ValueError(f"TrainConfig.max_seconds must be >= 0, got {self.max_seconds!r}")
        if self.data_order not in ("random", "sequential"):
            raise ValueError(f"TrainConfig.data_order must be 'random' or 'sequential', got {self.data_order!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def model_config(self) -> GPTConfig:
        """The GPTConfig of a model trained from scratch: the preset plus the overrides."""
        over = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                              "padded_vocab_size") if getattr(self, k) is not None}
        return GPTConfig.from_name(self.model, dropout=self.dropout, backend=self.backend, **over)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

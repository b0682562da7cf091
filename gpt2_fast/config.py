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


# Fields of TrainConfig that only steer a run (where it writes, how often it logs, how it
# computes the same math): they may differ when a run is resumed. batch_size / grad_accum /
# total_batch_size are checked together (the global batch must match, the split may change);
# max_steps may change (the schedule is re-anchored: see train.lr_at). Every other field must
# match the checkpoint's.
RUN_CONTROL_FIELDS = ("out_dir", "resume", "overwrite", "device", "compile", "eval_interval", "eval_iters",
                      "log_interval", "sample_interval", "sample_tokens", "sample_prompt",
                      "ckpt_interval", "keep_last", "keep_best", "progress", "tensorboard", "wandb",
                      "wandb_project", "wandb_run_name", "plot", "init_from", "max_steps_this_run",
                      "max_seconds", "time_schedule", "grad_checkpointing", "batch_size", "grad_accum",
                      "total_batch_size", "max_steps")


def _f(default, help: str):
    """A TrainConfig field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything `gpt2-fast train` needs; a TOML/JSON file and --key=value set these fields."""
    # model: a preset, with optional shape overrides (None keeps the preset's value)
    model: str = _f("gpt2", "the preset whose shape a from-scratch model takes: gpt2, gpt2-medium, "
                             "gpt2-large, gpt2-xl")
    n_layer: Optional[int] = _f(None, "number of transformer blocks (default: the preset's)")
    n_head: Optional[int] = _f(None, "attention heads per block (default: the preset's)")
    n_embd: Optional[int] = _f(None, "model width (default: the preset's)")
    block_size: Optional[int] = _f(None, "context length the model learns positions for (default 1024)")
    dropout: float = _f(0.0, "dropout on embeddings, attention probabilities and residuals")
    backend: str = _f("auto", "kernel backend of the fused ops: auto, torch, triton, cuda, cpp")
    padded_vocab_size: Optional[int] = _f(None, "embedding rows padded for matmul speed, e.g. 50304")
    init_from: str = _f("scratch", "'scratch', or a model to fine-tune: an HF folder, a .pt checkpoint, "
                                   "a training output folder (its latest checkpoint) or a preset name")
    # data
    data: str = _f("out/data", "a `gpt2-fast prepare` folder (or a glob of token shards)")
    data_order: str = _f("random", "'random' (shuffled windows each epoch) or 'sequential'")
    batch_size: int = _f(8, "B: sequences per process and micro-step")
    seq_len: int = _f(1024, "T: tokens per sequence (<= the model's block_size)")
    total_batch_size: int = _f(524288, "tokens per optimizer step (the GPT-2 paper's ~0.5M); gradient "
                                       "accumulation = total_batch_size / (batch_size x seq_len x "
                                       "processes); 0: use --grad_accum as given")
    grad_accum: int = _f(1, "micro-steps per optimizer step, used when total_batch_size=0")
    # optimization: AdamW, linear warmup then cosine decay to min_lr
    max_steps: int = _f(1000, "optimizer steps of the whole run (may be raised on --resume)")
    lr: float = _f(6e-4, "peak learning rate (after warmup)")
    min_lr: float = _f(6e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "steps of linear warmup from lr/warmup_steps to lr")
    weight_decay: float = _f(0.1, "AdamW weight decay (on 2-D weights only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    dtype: str = _f("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'float32' or 'bfloat16'")
    seed: int = _f(1337, "seed of the initial weights, data order and dropout")
    fsdp: bool = _f(False, "FSDP2 fully_shard (under torchrun) instead of DDP")
    grad_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass "
                                         "(less memory, ~1/3 more compute; same gradients)")
    # run control (may change on --resume)
    out_dir: str = _f("out/train", "the run folder: checkpoints, log.jsonl, config.json, loss.png "
                                   "(default out/train)")
    resume: str = _f("", "'auto' (the latest checkpoint in the run folder) or a checkpoint path")
    overwrite: bool = _f(False, "start afresh in a run folder that holds an earlier run: delete that "
                                "run's checkpoints, log.jsonl, config.json and plots (other files stay)")
    device: str = _f("", "cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    compile: bool = _f(False, "torch.compile the model")
    eval_interval: int = _f(250, "evaluate the val loss every this many steps and at the end; "
                                 "0: no evaluation (no val split needed)")
    eval_iters: int = _f(20, "val batches per evaluation (0: the whole val split)")
    log_interval: int = _f(10, "log (and sync with the device) every this many steps")
    sample_interval: int = _f(0, "print a sample every this many steps; 0: never")
    sample_tokens: int = _f(64, "tokens per sample")
    sample_prompt: str = _f("", "prompt of the samples")
    ckpt_interval: int = _f(500, "checkpoint every this many steps (and always at the end); 0: end only")
    keep_last: int = _f(3, "keep this many of the newest checkpoints")
    keep_best: bool = _f(True, "also keep best.pt: the weights with the lowest val loss so far")
    max_steps_this_run: int = _f(0, "stop (with a checkpoint) after this many steps; 0: no limit")
    max_seconds: float = _f(0.0, "stop (with a final eval and checkpoint) after this much wall time; "
                                 "0: no limit")
    time_schedule: bool = _f(False, "decay the learning rate over max_seconds of wall time instead of "
                                    "max_steps (a fixed time budget on a machine of unknown speed; "
                                    "not bit-reproducible)")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(False, "also log to TensorBoard (run folder/tb; needs tensorboard installed)")
    wandb: bool = _f(False, "also log to Weights & Biases (needs wandb installed)")
    wandb_project: str = _f("gpt2-fast", "the wandb project")
    wandb_run_name: str = _f("", "the wandb run name (default: the run folder's name)")
    plot: bool = _f(True, "write the loss curve to loss.png at the end (needs matplotlib)")

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_interval", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "eval_interval", "eval_iters", "sample_interval", "ckpt_interval",
                     "max_steps_this_run", "sample_tokens", "total_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.max_seconds, (int, float)) or self.max_seconds < 0:
            raise ValueError(f"TrainConfig.max_seconds must be >= 0, got {self.max_seconds!r}")
        if self.time_schedule and not self.max_seconds:
            raise ValueError("TrainConfig.time_schedule needs max_seconds > 0 (the time to decay over)")
        if self.data_order not in ("random", "sequential"):
            raise ValueError(f"TrainConfig.data_order must be 'random' or 'sequential', got {self.data_order!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.total_batch_size and self.grad_accum != 1:
            raise ValueError(f"give total_batch_size ({self.total_batch_size}) or grad_accum "
                             f"({self.grad_accum}), not both: grad_accum is derived from total_batch_size "
                             f"(set total_batch_size=0 to give grad_accum)")

    def model_config(self) -> GPTConfig:
        """The GPTConfig of a model trained from scratch: the preset plus the overrides."""
        over = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                              "padded_vocab_size") if getattr(self, k) is not None}
        return GPTConfig.from_name(self.model, dropout=self.dropout, backend=self.backend, **over)

    def accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step: total_batch_size / (B T world_size), or grad_accum."""
        if not self.total_batch_size:
            return self.grad_accum
        micro = self.batch_size * self.seq_len * world_size
        if self.total_batch_size % micro:
            lo = max(micro, self.total_batch_size // micro * micro)
            raise ValueError(f"total_batch_size {self.total_batch_size} is not a multiple of batch_size "
                             f"{self.batch_size} x seq_len {self.seq_len} x {world_size} process(es) = "
                             f"{micro} tokens; use e.g. {lo} or {lo + micro}")
        return self.total_batch_size // micro

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.accum_steps(world_size) * world_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

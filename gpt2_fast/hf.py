"""Read and write the HF GPT-2 checkpoint format (config.json + safetensors / pytorch_model.bin).

HF's GPT-2 stores its four projection weights as Conv1D, (in, out); ours are nn.Linear,
(out, in): those are transposed both ways. `attn.bias` / `attn.masked_bias` are HF's causal-mask
buffers, not weights, and are skipped. Loading builds the model on the meta device and assigns
the (memory-mapped) tensors, so a checkpoint costs about its own size in memory. Nothing is ever
unpickled: safetensors, or torch.load(weights_only=True).

`tie_word_embeddings` (HF's default True, GPT-2's layout) shares lm_head with wte; a checkpoint
with tie_word_embeddings=false keeps its own `lm_head.weight`, and GPTConfig.tie_word_embeddings
builds the model that way. save_pretrained also writes GPT-2's tokenizer files (tokenizer.py),
so AutoTokenizer loads the folder too.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from .atomic import atomic_write
from .config import PRESETS, GPTConfig
from .tokenizer import N_VOCAB, write_hf_tokenizer_files

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
HUB_REPOS = {name: f"openai-community/{name}" for name in PRESETS}

# HF GPT2Config features this model does not implement: (key, value GPT-2 uses).
_REQUIRED_HF_SETTINGS = (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                         ("scale_attn_weights", True), ("add_cross_attention", False))


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    if not isinstance(hf, dict):
        raise ValueError(f"expected a JSON object, got {type(hf).__name__}")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"not an HF GPT-2 config: missing {missing}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"expected an HF config with model_type 'gpt2', got {hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"expected GPT-2's tanh GELU (activation_function 'gelu_new'), got {act!r}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"expected n_inner None or 4*n_embd, got {hf.get('n_inner')!r}")
    for key, value in _REQUIRED_HF_SETTINGS:
        if hf.get(key, value) != value:
            raise ValueError(f"HF config sets {key}={hf[key]!r}; gpt2_fast supports only {value!r}")
    kw = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
              vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
              layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0,
              tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
    kw.update(overrides)
    return GPTConfig(**kw)


def config_to_hf(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": config.tie_word_embeddings,
        "scale_attn_weights": True, "use_cache": True,
    }


def _resolve_directory(path_or_name: str) -> str:
    if os.path.isdir(path_or_name):
        return path_or_name
    if path_or_name not in HUB_REPOS:
        raise ValueError(f"{path_or_name!r} is neither a local directory nor a GPT-2 preset "
                         f"({', '.join(HUB_REPOS)})")
    how = (f"pass a local directory holding config.json and model.safetensors (or pytorch_model.bin), "
           f"e.g. GPT.from_pretrained('/path/to/{path_or_name}') or --model /path/to/{path_or_name}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(f"huggingface_hub is not installed, so {path_or_name!r} cannot be "
                           f"downloaded; {how}") from e
    try:
        return snapshot_download(HUB_REPOS[path_or_name], allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, no route to the hub, HF_HUB_OFFLINE=1 without a cached copy
        raise RuntimeError(f"could not get {path_or_name!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {how}") from e


def _read_weight_file(path: str) -> dict:
    """The tensors of one weight file; a missing, truncated or foreign file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)  # memory-mapped
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # SafetensorError, pickle/zip errors, EOFError, RuntimeError ...
        why = (str(e).splitlines() or [""])[0][:200] or ("empty file" if os.path.getsize(path) == 0 else "")
        raise ValueError(f"{path}: corrupt, truncated or not a weight file ({type(e).__name__}: {why})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


def read_hf_state_dict(directory: str) -> dict:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return _read_weight_file(os.path.join(directory, name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(directory, index)
        if os.path.exists(path):
            shards = sorted(set(_read_json(path, "weight_map")["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(_read_weight_file(os.path.join(directory, shard)))
            return sd
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or sharded index in {directory}")


def _read_json(path: str, required_key: Optional[str] = None) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict) or (required_key and required_key not in d):
        raise ValueError(f"{path}: expected a JSON object" + (f" with {required_key!r}" if required_key else ""))
    return d


def hf_to_ours(sd: dict, tied: bool = True) -> dict:
    """HF GPT-2 keys/layout -> ours. Accepts GPT2Model keys (no 'transformer.' prefix) too.
    tied: drop lm_head.weight (it is wte); untied: keep it."""
    out = {}
    for key, t in sd.items():
        if key.endswith(SKIPPED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue  # masks; a tied lm_head is wte
        if key == "lm_head.weight":
            out[key] = t
            continue
        if not key.startswith("transformer."):
            key = "transformer." + key
        out[key] = t.t() if key.endswith(CONV1D_SUFFIXES) else t
    return out


@contextlib.contextmanager
def _meta_without_init():
    """torch.device("meta") for building a model whose weights are assigned next, with
    nn.Embedding's normal_ init skipped on meta tensors: there normal_ runs a Python decomposition
    that imports torch._dynamo (~900 modules, ~75 MiB resident for the process's life) to fill
    values that are overwritten anyway. Real tensors (another thread's) still initialize."""
    real = torch.nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else real(tensor, *args, **kwargs)
    torch.nn.init.normal_ = normal_
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_ = real


def load_pretrained(cls, path_or_name: str, dtype: Optional[torch.dtype] = None, device=None,
                    **config_overrides):
    directory = _resolve_directory(path_or_name)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{directory} has no config.json (expected an HF GPT-2 checkpoint)")
    try:
        config = config_from_hf(_read_json(cfg_path), **config_overrides)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}" if cfg_path not in str(e) else str(e)) from None
    tied = config.tie_word_embeddings
    sd = hf_to_ours(read_hf_state_dict(directory), tied=tied)
    with _meta_without_init():
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if not tied and "lm_head.weight" not in sd:
        raise ValueError(f"{cfg_path} sets tie_word_embeddings=false but the checkpoint in {directory} "
                         f"has no lm_head.weight")
    rows = config.embedding_rows
    for key in ("transformer.wte.weight", "lm_head.weight"):  # pad the embedding rows
        if rows != config.vocab_size and key in sd and sd[key].shape[0] == config.vocab_size:
            w = sd[key]
            sd[key] = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshapen = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k])}"
                 for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k]]
    if missing or unexpected or misshapen:
        raise ValueError(f"checkpoint {directory} does not match GPT-2 {config.n_layer}x{config.n_embd}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"misshapen {misshapen[:8]}")
    target = dtype or next(iter(sd.values())).dtype
    if not target.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {target}")
    sd = {k: v.to(device=device or "cpu", dtype=target).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    return model


def save_pretrained(model, directory: str, tokenizer: bool = True) -> None:
    """config.json + model.safetensors (+ GPT-2's tokenizer files unless tokenizer=False)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    config = model.config
    sd = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if key in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:config.vocab_size]  # drop the padding rows
        t = t.t() if key.endswith(CONV1D_SUFFIXES) else t
        sd[key] = t.detach().to("cpu").contiguous()
    atomic_write(os.path.join(directory, "model.safetensors"),
                  lambda p: save_file(sd, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config_to_hf(config), f, indent=2)
    atomic_write(os.path.join(directory, "config.json"), write_config)
    if tokenizer and config.vocab_size == N_VOCAB:  # our tokenizer's ids only fit GPT-2's vocabulary
        write_hf_tokenizer_files(directory, model_max_length=config.block_size)

import pytest

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.config import PRESETS


@pytest.mark.parametrize("name,layers,width,heads", [
    ("gpt2", 12, 768, 12), ("gpt2-medium", 24, 1024, 16), ("gpt2-large", 36, 1280, 20),
    ("gpt2-xl", 48, 1600, 25)])
def test_presets(name, layers, width, heads):
    cfg = GPTConfig.from_name(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (layers, width, heads)
    assert (cfg.vocab_size, cfg.block_size, cfg.head_dim) == (50257, 1024, 64)


def test_preset_names_are_exact():
    assert set(PRESETS) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'GPT2'"):
        GPTConfig.from_name("GPT2")


def test_gpt2_parameter_count():
    import torch
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    assert model.num_params(non_embedding=False) == 124_439_808  # HF's gpt2, lm_head tied


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=100, n_head=3), "divisible"), (dict(n_layer=0), "n_layer"),
    (dict(backend="cudnn"), "backend"), (dict(dropout=1.0), "dropout"),
    (dict(padded_vocab_size=100), "padded_vocab_size")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layer": 2, "n_heads": 2})
    assert GPTConfig.from_dict(GPTConfig(n_layer=2).to_dict()).n_layer == 2

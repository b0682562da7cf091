"""gpt2_fast.load.load_model: HF folders, .pt checkpoints, training output folders, presets."""
import json
import os

import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.checkpoint import CheckpointError, checkpoint_path, save_checkpoint
from gpt2_fast.load import describe, load_model, resolve

CFG = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).eval()


def _save_ckpt(folder, step, model):
    path = checkpoint_path(str(folder), step)
    save_checkpoint(path, {"step": step, "model_config": model.config.to_dict(),
                           "model": model.state_dict()})
    return path


def _same(a, b):
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=0, atol=0)


def test_training_folder_loads_its_latest_checkpoint(tmp_path):
    old, new = _model(0), _model(1)
    _save_ckpt(tmp_path, 10, old)
    latest = _save_ckpt(tmp_path, 20, new)
    with open(tmp_path / "config.json", "w") as f:  # a training run's config, not HF's
        json.dump({"model": "gpt2", "batch_size": 8}, f)
    assert resolve(str(tmp_path)) == ("checkpoint", latest)
    _same(load_model(str(tmp_path)), new)
    _same(load_model(latest), new)
    assert "ckpt_00000020.pt" in describe(str(tmp_path))


def test_hf_folder_dtype_device_and_overrides(tmp_path):
    m = _model()
    m.save_pretrained(str(tmp_path))
    got = load_model(str(tmp_path))
    _same(got, m)
    assert not got.training
    half = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu", backend="torch")
    assert half.transformer.wte.weight.dtype == torch.bfloat16 and half.config.backend == "torch"
    ck = _save_ckpt(tmp_path / "run", 5, m)
    assert load_model(ck, dropout=0.1).config.dropout == 0.1


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load_model(str(tmp_path / "empty"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "gpt2", "out_dir": str(run)}))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_model(str(run))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    empty_pt = tmp_path / "zero.pt"
    empty_pt.write_bytes(b"")
    with pytest.raises(CheckpointError, match="zero.pt"):
        load_model(str(empty_pt))
    _model().save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="pass the folder"):
        load_model(str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        load_model(_save_ckpt(tmp_path / "r2", 1, _model()), nonsense=1)
    assert resolve("gpt2") == ("preset", "gpt2")
    os.chdir(tmp_path)  # an existing folder named like a preset wins over the hub
    (tmp_path / "gpt2").mkdir()
    _model().save_pretrained(str(tmp_path / "gpt2"))
    assert resolve("gpt2") == ("hf", "gpt2")

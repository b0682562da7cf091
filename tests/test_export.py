"""`gpt2-fast export CKPT OUT_DIR`: an HF folder that AutoTokenizer and GPT2LMHeadModel load offline."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt2_fast import GPT, GPTConfig, get_tokenizer  # noqa: E402
from gpt2_fast.checkpoint import checkpoint_path, save_checkpoint  # noqa: E402
from gpt2_fast.cli import main  # noqa: E402


def _training_folder(folder, untied=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, tie_word_embeddings=not untied,
                          padded_vocab_size=50304)).eval()
    for step in (5, 10):  # the export takes the latest
        with torch.no_grad():
            model.transformer.ln_f.bias.fill_(step * 0.01)
        save_checkpoint(checkpoint_path(str(folder), step),
                        {"step": step, "model_config": model.config.to_dict(), "model": model.state_dict()})
    return model


@pytest.mark.parametrize("untied", [False, True])
def test_export_end_to_end_offline(tmp_path, monkeypatch, capsys, untied):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = _training_folder(tmp_path / "run", untied)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert "ckpt_00000010.pt" in capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(str(out))
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    text = "In the beginning God created the heaven and the earth."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == get_tokenizer().encode(text)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    assert hf.config.tie_word_embeddings is (not untied)


def test_export_never_replaces_files_unasked(tmp_path, capsys):
    _training_folder(tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("mine")
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "run"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-fast export: error: ") and "--overwrite" in err and err.count("\n") == 1
    assert (out / "config.json").read_text() == "mine"
    assert main(["export", str(tmp_path / "run"), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert GPT.from_pretrained(str(out)).transformer.wte.weight.dtype == torch.bfloat16
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "afile")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["export", str(tmp_path / "run")]) == 2
    assert "give the output folder once" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "o3")]) == 0
    assert (tmp_path / "o3" / "model.safetensors").exists()

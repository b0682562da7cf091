import re
import subprocess
import sys

import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.cli import main


def test_help_everywhere(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--model --config is required" in _one_error_line(capsys, "generate")


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends on cpu" in out and "auto picks" in out


def test_info_names_the_attention_that_runs(monkeypatch):
    """`info` reports attention as the model's dispatch resolves it: SDPA when the attention_fwd
    choice picks it, the Triton backward variant, and CPU training's torch SDPA beside cpp."""
    from gpt2_fast import extension, info
    pytest.importorskip("triton")
    monkeypatch.delenv("GPT2_FAST_BACKEND", raising=False)
    monkeypatch.setenv("GPT2_FAST_ATTN_FWD", "sdpa")
    assert "attention=sdpa (torch SDPA forward and backward)," in info.picks_line("cuda")
    monkeypatch.setenv("GPT2_FAST_ATTN_FWD", "triton")
    assert re.search(r"attention=triton \(backward: (triton_det|triton_atomic|sdpa)\),", info.picks_line("cuda"))
    if extension.unavailable_reason("cpu") is None:
        assert "attention=cpp (with gradients: torch SDPA)," in info.picks_line("cpu")
    cuda_ext = info.attention_pick("cuda", "cuda")  # the extension's attention: the Triton backward
    assert re.fullmatch(r"cuda \(backward: triton (triton_det|triton_atomic|sdpa)\)", cuda_ext)
    monkeypatch.setenv("GPT2_FAST_BACKEND", "cuda")  # not runnable on CPU tensors: said, not raised
    assert "cuda picks: layer_norm=unavailable" in info.picks_line("cpu")


def test_generate_from_local_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).save_pretrained(str(tmp_path))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Hello") and "ms/token" in cap.err


def test_generate_errors_are_clear(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_pretrained(str(tmp_path))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "word " * 20]) == 2
    assert "block_size 16" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "gpt2_fast", "generate", "--config", "gpt2", "--prompt",
                        "The", "--max-new-tokens", "3", "--seed", "0", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The")


def _one_error_line(capsys, cmd):
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2-fast {cmd}: error: ") and err.count("\n") == 1, err
    return err


def test_version(capsys):
    assert main(["--version"]) == 0
    from gpt2_fast import __version__
    assert capsys.readouterr().out.startswith(f"gpt2-fast {__version__}")


def test_generate_from_a_training_folder(tmp_path, capsys):
    from gpt2_fast.checkpoint import checkpoint_path, save_checkpoint
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    save_checkpoint(checkpoint_path(str(tmp_path), 3), {"step": 3, "model_config": m.config.to_dict(),
                                                       "model": m.state_dict()})
    (tmp_path / "config.json").write_text('{"model": "gpt2", "batch_size": 4}')  # the run's config
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


@pytest.mark.parametrize("flags, expect", [
    (["--temperature", "nan"], "--temperature: expected a finite number"),
    (["--temperature", "inf"], "--temperature: expected a finite number"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k: expected a positive integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "tpu"], "--device expects cpu, cuda"),
    (["--backend", "fast"], "--backend expects one of"),
])
def test_generate_flags_are_checked_before_loading(flags, expect, tmp_path, capsys):
    # the model does not exist: a flag error proves the flags were checked first
    code = main(["generate", "--model", str(tmp_path / "not-there")] + flags)
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "not-there" not in err, err
    assert err.startswith("gpt2-fast generate: error: ") and err.count("\n") == 1


def test_default_max_new_tokens_is_clipped_to_the_block(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8)).save_pretrained(str(tmp_path))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hello", "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert "clipped to 7" in cap.err and "block_size is 8" in cap.err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "50"]) == 2
    assert "block_size 8" in _one_error_line(capsys, "generate")


def test_debug_switch_and_internal_errors(monkeypatch, capsys):
    import gpt2_fast.cli as cli

    def boom(args):
        raise KeyError("n_embd")
    monkeypatch.setattr(cli, "run", boom)  # `info` runs cli.run
    assert main(["info"]) == 1
    assert "KeyError" in _one_error_line(capsys, "info")
    monkeypatch.setenv("GPT2_FAST_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info"])


def _tiny_training_folder(folder):
    from gpt2_fast.checkpoint import checkpoint_path, save_checkpoint
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    save_checkpoint(checkpoint_path(str(folder), 7), {"step": 7, "model_config": m.config.to_dict(),
                                                     "model": m.state_dict()})
    return m


def test_eval_val_data_and_hellaswag_from_the_cli(tmp_path, capsys):
    import json

    from gpt2_fast.data import prepare
    from gpt2_fast.eval import val_loss
    m = _tiny_training_folder(tmp_path / "run")
    (tmp_path / "a.txt").write_text("In the beginning God created the heaven and the earth. " * 800)
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "data"), val_fraction=0.3, shard_tokens=1000,
            progress=False)
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"ctx": "In the", "endings": ["beginning", "end"], "label": 0}) + "\n")
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tmp_path / "run"), "--val-data", str(tmp_path / "data"),
                 "--hellaswag", str(hs), "--out", str(out), "--batch-size", "3"]) == 0
    res = json.loads(out.read_text())
    assert [r["task"] for r in res] == ["val", "hellaswag"]
    assert res[0]["loss"] == pytest.approx(val_loss(m, str(tmp_path / "data"))["loss"], rel=1e-6)
    assert set(res[1]) >= {"acc", "acc_norm", "acc_bytes"}
    assert "val" in capsys.readouterr().out
    # --out exists: refused before the model loads, the file kept
    assert main(["eval", "--model", str(tmp_path / "run"), "--val-data", str(tmp_path / "data"),
                 "--json", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys, "eval") and json.loads(out.read_text()) == res


@pytest.mark.parametrize("flags, expect", [
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--json", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/no/such/dir/r.json"], "does not exist"),
    (["--lambada", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--val-data", "{tmp}"], "no val shards"),
    (["--task", "nope:x"], "unknown task 'nope'"),
    ([], "nothing to evaluate"),
    (["--device", "cuda:99"] if torch.cuda.is_available() else ["--device", "cuda"], "--device cuda"),
])
def test_eval_errors_before_loading(flags, expect, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world")
    base = [] if flags and flags[0] in ("--lambada", "--val-data", "--task") or not flags else \
        ["--ppl", str(tmp_path / "t.txt")]
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["eval", "--model", str(tmp_path / "not-there")] + base + flags) == 2
    err = _one_error_line(capsys, "eval")
    assert expect in err and "not-there" not in err, err


def test_broken_model_files_are_one_line_naming_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    from gpt2_fast.hf import save_pretrained
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)), str(tmp_path / "hf"),
                    tokenizer=False)
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:300])
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": "gpt2"}')
    for model, expect in ((tmp_path / "hf", "model.safetensors: corrupt, truncated"),
                          (tmp_path / "zero.pt", "zero.pt is corrupt or incomplete"),
                          (tmp_path / "run", "holds no checkpoints")):
        for cmd in (["generate", "--prompt", "x"], ["eval", "--ppl", str(st)]):
            assert main([cmd[0], "--model", str(model)] + cmd[1:]) == 2
            assert expect in _one_error_line(capsys, cmd[0])


def test_prepare_out_is_a_file_and_bad_input(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    (tmp_path / "a.txt").write_text("hello world")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "exists and is not a folder" in _one_error_line(capsys, "prepare")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    assert main(["prepare", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "bin.txt: not UTF-8 text" in _one_error_line(capsys, "prepare")


def test_info_says_loudly_when_the_extension_is_missing(monkeypatch, capsys):
    from gpt2_fast import extension
    monkeypatch.setattr(extension, "unavailable_reason", lambda device_type: "gpt2_fast._C is not built")
    from gpt2_fast.info import extension_lines
    out = "\n".join(extension_lines())  # what `gpt2-fast info` prints after the device line
    assert "WARNING: the compiled extension gpt2_fast._C is NOT available" in out and "GPT2_FAST_JIT=1" in out
    assert "reason: gpt2_fast._C is not built" in out and "JIT sources: " in out


def test_generate_missing_draft_model_is_named_before_loading(tmp_path, capsys):
    assert main(["generate", "--config", "gpt2", "--draft-model", str(tmp_path / "nope")]) == 2
    assert "--draft-model: model" in _one_error_line(capsys, "generate")

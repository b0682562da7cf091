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

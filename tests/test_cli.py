import subprocess
import sys

import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.cli import main


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--max-new-tokens" in capsys.readouterr().out


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
    assert "neither a local directory" in capsys.readouterr().err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "gpt2_fast", "generate", "--config", "gpt2", "--prompt",
                        "The", "--max-new-tokens", "3", "--seed", "0", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The")

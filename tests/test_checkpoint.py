"""gpt2_fast.checkpoint: atomic writes, keep-last-K, RNG round trip, clear errors on bad files."""
import errno
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gpt2_fast import checkpoint as C
from gpt2_fast.config import GPTConfig
from gpt2_fast.model import GPT

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)


def _state(step: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = GPT(TINY)
    return {"model_config": TINY.to_dict(), "model": model.state_dict(), "optimizer": {},
            "rng": [C.rng_state()], "data": {"epoch": 0, "pos": step}, "metrics": {"train_loss": 1.0 * step}}


def test_round_trip_and_keep_last(tmp_path):
    mgr = C.CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        path = mgr.save(step, _state(step, seed=step))
    assert [os.path.basename(p) for p in C.list_checkpoints(str(tmp_path))] == ["ckpt_00000002.pt",
                                                                                  "ckpt_00000003.pt"]
    assert mgr.latest() == path
    state = C.load_checkpoint(path)
    assert state["step"] == 3 and state["data"]["pos"] == 3
    assert all(t.device.type == "cpu" for t in state["model"].values())
    torch.manual_seed(3)
    ref = GPT(TINY).state_dict()
    assert all(torch.equal(ref[k], state["model"][k]) for k in ref)
    model = C.load_model_from_checkpoint(str(tmp_path))  # a folder means its latest checkpoint
    assert torch.equal(model.transformer.wte.weight, ref["transformer.wte.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = C.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_corrupt_checkpoint_names_the_file_and_the_previous_stays_usable(tmp_path):
    mgr = C.CheckpointManager(str(tmp_path), keep_last=3)
    good = mgr.save(1, _state(1))
    bad = mgr.save(2, _state(2))
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    with pytest.raises(C.CheckpointError, match=r"ckpt_00000002.pt is corrupt or incomplete.*ckpt_00000001.pt"):
        C.load_checkpoint(bad)
    assert C.load_checkpoint(good)["step"] == 1
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(C.CheckpointError, match="not a gpt2_fast training checkpoint"):
        C.load_checkpoint(str(junk))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_checkpoint(str(tmp_path / "nope.pt"))


def test_full_disk_keeps_every_previous_checkpoint(tmp_path, monkeypatch):
    mgr = C.CheckpointManager(str(tmp_path), keep_last=1)
    first = mgr.save(1, _state(1))
    real_save = torch.save

    def save_then_fill_disk(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    with pytest.raises(C.CheckpointError, match=r"could not write checkpoint .*ckpt_00000002.pt.*No space left"
                                                r".*ckpt_00000001.pt is intact"):
        mgr.save(2, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert C.list_checkpoints(str(tmp_path)) == [first]  # keep_last=1 did not delete it
    assert os.listdir(tmp_path) == [os.path.basename(first)]  # no temp file left
    assert C.load_checkpoint(first)["step"] == 1


def test_kill_during_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process SIGKILLed halfway through writing checkpoint 2: checkpoint 1 loads, no file named
    ckpt_00000002.pt exists, and the next save clears the orphaned temp file."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoint import _state
        from gpt2_fast import checkpoint as C
        mgr = C.CheckpointManager({str(tmp_path)!r}, keep_last=1)
        mgr.save(1, _state(1))
        real_save = torch.save
        def dying_save(obj, f, *a, **kw):
            real_save(obj, f, *a, **kw)
            with open(f, "r+b") as fh:       # half of the bytes are on disk when the kill comes
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        mgr.save(2, _state(2))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    names = sorted(os.listdir(tmp_path))
    assert "ckpt_00000001.pt" in names and "ckpt_00000002.pt" not in names
    assert any(n.startswith(".tmp-ckpt_00000002.pt") for n in names)
    assert C.load_checkpoint(str(tmp_path / "ckpt_00000001.pt"))["step"] == 1
    C.CheckpointManager(str(tmp_path), keep_last=1).save(3, _state(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000003.pt"]


def test_generate_cli_loads_a_training_checkpoint(tmp_path, capsys):
    from gpt2_fast.cli import main
    path = C.CheckpointManager(str(tmp_path)).save(5, _state(5))
    assert main(["generate", "--model", path, "--prompt", "In the beginning", "--max-new-tokens", "4",
                 "--seed", "0", "--quiet", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")


def test_pruning_keeps_the_newest_and_never_touches_higher_steps_or_best(tmp_path):
    """keep_last counts the checkpoint just written; checkpoints of higher steps (which a run
    folder can only hold when a user put them there) and best.pt are never deleted."""
    mgr = C.CheckpointManager(str(tmp_path), keep_last=2)
    for step in (50, 1, 2):
        path = mgr.save(step, _state(step))
    best = mgr.save_best(2, _state(2))
    path = mgr.save(3, _state(3))
    names = sorted(os.listdir(tmp_path))
    assert names == ["best.pt", "ckpt_00000002.pt", "ckpt_00000003.pt", "ckpt_00000050.pt"], names
    assert path.endswith("ckpt_00000003.pt") and C.load_checkpoint(path)["step"] == 3
    b = C.load_checkpoint(best)
    assert b["step"] == 2 and b["resumable"] is False and "optimizer" not in b
    assert C.list_checkpoints(str(tmp_path))[-1].endswith("ckpt_00000050.pt")  # best.pt is not a ckpt_*


def test_model_state_dict_stores_a_tied_lm_head_once(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    sd = C.model_state_dict(model)
    assert "lm_head.weight" not in sd
    path = C.CheckpointManager(str(tmp_path)).save(1, {**_state(1), "model": sd})
    loaded = C.load_model_from_checkpoint(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # the CUDA case: .to("cpu") makes a second copy per name; model_state_dict drops it anyway
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(untied, tmp_path / "twice.pt")
    torch.save(sd, tmp_path / "once.pt")
    wte = model.transformer.wte.weight.numel() * 4
    assert os.path.getsize(tmp_path / "twice.pt") - os.path.getsize(tmp_path / "once.pt") > 0.95 * wte

"""`gpt2-fast demo`: end to end on a small corpus, reruns that never delete the user's files,
bad flags as one line; the whole bundled Bible is the slow test."""
import gzip
import json
import math
import os

import pytest
import torch

from gpt2_fast import data as D
from gpt2_fast.demo import demo, prepared, train_config


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_corpus") / "kjv_small.txt"
    with gzip.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        path.write_text(f.read(400_000), encoding="utf-8")  # ~95k tokens: one 4096-token val block
    return str(path)


@pytest.mark.slow  # ~150 s at load 15 here; the rule itself (--overwrite keeps foreign files) is in test_train
def test_demo_reruns_replace_only_the_demos_own_files(small_corpus, tmp_path, capsys):
    """Issue 14.2: `demo --out D` used to rmtree D/train. A rerun replaces the earlier demo run's
    checkpoints and log, and leaves every other file in D/train alone."""
    run = tmp_path / "train"
    run.mkdir()
    (run / "ckpt_00000040.pt").write_bytes(b"an earlier demo's checkpoint")
    (run / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 40, "loss": 1.0}) + "\n")
    (run / "notes.txt").write_text("mine")
    (run / "sub").mkdir()
    (run / "sub" / "keep.bin").write_bytes(b"x")
    out = demo(str(tmp_path), steps=3, batch_size=2, device="cpu", corpus=small_corpus, sample_tokens=4)
    names = sorted(os.listdir(run))
    assert names == ["ckpt_00000003.pt", "config.json", "log.jsonl", "loss.png", "notes.txt", "sub"], names
    assert (run / "notes.txt").read_text() == "mine" and (run / "sub" / "keep.bin").exists()
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3]
    # the final evaluation reads the whole val split (every full batch of it)
    val_tokens = sum(D.read_shard(p).size for p in D.shard_paths(str(tmp_path / "data"), "val"))
    assert val_tokens - 2 * 256 - 1 < out["val_tokens"] <= val_tokens
    assert [r["step"] for r in log if r["kind"] == "eval"] == [3] and math.isfinite(out["val_loss"])
    assert out["tokens"] == 3 * 2 * 256 and out["tokens_per_s"] > 0
    err = capsys.readouterr()
    assert "[3/4] val loss" in err.err and "tokens/s" in err.err and err.out.startswith("And God said")


def test_demo_schedule_follows_the_clock():
    cfg = train_config("d", "r", torch.device("cpu"), 300.0, None, None, None)
    assert cfg.time_schedule and cfg.max_seconds == 300.0 and cfg.eval_iters == 0 and cfg.overwrite
    assert (cfg.n_layer, cfg.n_embd, cfg.batch_size, cfg.lr) == (4, 256, 4, 1.5e-3)
    fixed = train_config("d", "r", torch.device("cpu"), 300.0, 50, 2, 1e-3)
    assert not fixed.time_schedule and fixed.max_steps == 50 and fixed.batch_size == 2 and fixed.lr == 1e-3


def test_demo_bad_flags_are_one_line(capsys):
    from gpt2_fast.cli import main
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "gpt2-fast demo: error: --steps must be >= 1, got 0\n"
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = demo(str(tmp_path), steps=3, batch_size=2, device="cpu")
    assert out["step"] == 3 and os.path.exists(out["checkpoint"])
    assert math.isfinite(out["val_loss"]) and 5.0 < out["baseline_loss"] < 7.0
    assert prepared(str(tmp_path / "data"), D.DEFAULT_CORPUS)
    assert capsys.readouterr().out.startswith("And God said")
    assert os.path.exists(tmp_path / "train" / "loss.png")

"""gpt2_fast.train: config parsing, schedule, a real (tiny) run, exact resume, signals, bad input."""
import gzip
import json
import os
import signal
import threading

import pytest
import torch

from gpt2_fast import data as D
from gpt2_fast.checkpoint import list_checkpoints, load_checkpoint
from gpt2_fast.config import TrainConfig
from gpt2_fast.train import build_config, lr_at, make_optimizer, train

TINY = dict(model="gpt2", n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, batch_size=2,
            lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_interval=0, eval_iters=2, log_interval=1,
            ckpt_interval=0, progress=False, plot=False, tensorboard=False, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 200k characters of the bundled Bible (~45k tokens), prepared."""
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        (root / "kjv.txt").write_text(f.read(200_000), encoding="utf-8")
    D.prepare([str(root / "kjv.txt")], str(root / "data"), val_fraction=0.1, progress=False)
    return str(root / "data")


def cfg(corpus, out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": corpus, "out_dir": str(out), **kw})


# -- configuration -----------------------------------------------------------------------------

def test_build_config_types_and_files(tmp_path):
    c = build_config("gpt2-medium", {"batch_size": "4", "lr": "3e-4", "compile": "true", "n_layer": "none"})
    assert (c.model, c.batch_size, c.lr, c.compile, c.n_layer) == ("gpt2-medium", 4, 3e-4, True, None)
    with pytest.raises(ValueError, match="--batch_size expects int, got 'four'"):
        build_config(None, {"batch_size": "four"})
    with pytest.raises(ValueError, match="unknown TrainConfig field 'batchsize'"):
        build_config(None, {"batchsize": "4"})
    (tmp_path / "a.toml").write_text('model = "gpt2"\nbatch_size = 2\nlr = 1\n[other]\nx = 1\n')
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['other'\]"):
        build_config(str(tmp_path / "a.toml"))
    (tmp_path / "b.toml").write_text('[train]\nbatch_size = 2\nlr = 1\nseq_len = 64\n')
    c = build_config(str(tmp_path / "b.toml"), {"seq_len": "32"})
    assert (c.batch_size, c.lr, c.seq_len) == (2, 1.0, 32) and isinstance(c.lr, float)
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": "2"}))
    with pytest.raises(TypeError, match="batch_size expects int, got str"):
        build_config(str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="data_order"):
        build_config(None, {"data_order": "shuffle"})
    assert TrainConfig(n_layer=3, n_embd=48, n_head=3, block_size=64).model_config().n_layer == 3


def test_lr_schedule_and_decay_groups():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(c, s) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[109] > 0.1
    assert lr_at(c, 110) == pytest.approx(0.1) and lr_at(c, 500) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    from gpt2_fast.model import GPT
    model = GPT(TrainConfig(**TINY).model_config())
    opt = make_optimizer(model, c, fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == c.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# -- training ----------------------------------------------------------------------------------

def test_30_steps_lower_the_loss_on_real_text(corpus, tmp_path):
    out = train(cfg(corpus, tmp_path, max_steps=30, batch_size=4, eval_interval=10, plot=True))
    losses = [r["loss"] for r in out["history"] if r["kind"] == "train"]
    vals = [r["val_loss"] for r in out["history"] if r["kind"] == "eval"]
    assert len(losses) == 30 and losses[0] > 10.0
    assert sum(losses[-5:]) / 5 < losses[0] - 3.0
    assert len(vals) == 3 and vals[-1] < vals[0] < 10.5
    assert out["checkpoint"] == str(tmp_path / "ckpt_00000030.pt")
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 31))
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    state = load_checkpoint(out["checkpoint"])
    assert state["step"] == 30 and state["train_config"]["max_steps"] == 30


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_is_bit_identical(corpus, tmp_path):
    """Stopped at step 3 and resumed == 6 steps straight: dropout (torch RNG), random data order,
    gradient accumulation, an eval in between, the LR schedule."""
    kw = dict(max_steps=6, dropout=0.1, grad_accum=2, eval_interval=2, ckpt_interval=0)
    full = train(cfg(corpus, tmp_path / "full", **kw))
    part = train(cfg(corpus, tmp_path / "part", max_steps_this_run=3, **kw))
    assert part["step"] == 3 and list_checkpoints(str(tmp_path / "part"))[-1].endswith("ckpt_00000003.pt")
    rest = train(cfg(corpus, tmp_path / "part", resume="auto", **kw))
    assert rest["step"] == 6
    a, b = _weights(full["checkpoint"]), _weights(rest["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fa = [r["loss"] for r in full["history"] if r["kind"] == "train"]
    fb = [r["loss"] for r in part["history"] + rest["history"] if r["kind"] == "train"]
    assert fa == fb
    oa, ob = load_checkpoint(full["checkpoint"])["optimizer"], load_checkpoint(rest["checkpoint"])["optimizer"]
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_sigint_writes_a_checkpoint_and_stops(corpus, tmp_path):
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        out = train(cfg(corpus, tmp_path, max_steps=100000, max_seconds=120.0))
    finally:
        timer.cancel()
    assert out["interrupted"] == signal.SIGINT
    assert 0 < out["step"] < 100000
    assert load_checkpoint(out["checkpoint"])["step"] == out["step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_fine_tune_from_checkpoint_and_hf_dir(corpus, tmp_path):
    first = train(cfg(corpus, tmp_path / "a", max_steps=2))
    tuned = train(cfg(corpus, tmp_path / "b", max_steps=2, init_from=first["checkpoint"], n_layer=None))
    assert tuned["step"] == 2
    from gpt2_fast.checkpoint import load_model_from_checkpoint
    load_model_from_checkpoint(first["checkpoint"]).save_pretrained(str(tmp_path / "hf"))
    out = train(cfg(corpus, tmp_path / "c", max_steps=1, init_from=str(tmp_path / "hf")))
    assert out["step"] == 1
    assert load_checkpoint(out["checkpoint"])["model_config"]["n_layer"] == 2


def test_bad_input(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len 64 is larger than the model's block_size 32"):
        train(cfg(corpus, tmp_path / "a", seq_len=64))
    first = train(cfg(corpus, tmp_path / "b", max_steps=1))
    with pytest.raises(ValueError, match="block_size 64 is larger than the model's block_size 32"):
        train(cfg(corpus, tmp_path / "c", max_steps=1, init_from=first["checkpoint"], block_size=64))
    with pytest.raises(ValueError, match=r"cannot resume .*ckpt_00000001.pt with a different configuration "
                                         r"\(lr: checkpoint 0.01, now 0.02"):
        train(cfg(corpus, tmp_path / "b", max_steps=1, lr=2e-2, resume="auto"))
    with pytest.raises(ValueError, match="fewer than one batch needs"):
        train(cfg(corpus, tmp_path / "d", batch_size=4000))
    with pytest.raises(FileNotFoundError, match="no train shards"):
        train(cfg(str(tmp_path / "nodata"), tmp_path / "e"))
    with pytest.raises(ValueError, match="init_from"):
        train(cfg(corpus, tmp_path / "f", init_from="nowhere"))


def test_cli_train_and_eval(corpus, tmp_path, capsys):
    from gpt2_fast.cli import main
    out = str(tmp_path / "run")
    args = ["train", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--seq_len=32",
            "--batch_size=2", "--max_steps=2", f"--data={corpus}", f"--out_dir={out}", "--progress=false",
            "--plot=false", "--device=cpu"]
    assert main(args) == 0
    ckpt = os.path.join(out, "ckpt_00000002.pt")
    assert os.path.exists(ckpt)
    assert main(["train", "--batch_size=x", f"--data={corpus}"]) == 2
    assert "expects int" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 4)
    assert main(["eval", "--model", ckpt, "--ppl", str(text), "--max-length", "16", "--device", "cpu"]) == 0
    assert "ppl" in capsys.readouterr().out

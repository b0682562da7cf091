"""gpt2_fast.train: config parsing, schedule, a real (tiny) run, exact resume, signals, bad input."""
import gzip
import json
import math
import os
import signal
import threading
import time

import pytest
import torch

from gpt2_fast import data as D
from gpt2_fast.checkpoint import list_checkpoints, load_checkpoint
from gpt2_fast.config import TrainConfig
from gpt2_fast.train import build_config, lr_at, make_optimizer, train

TINY = dict(model="gpt2", n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, batch_size=2,
            lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_interval=0, eval_iters=2, log_interval=1, total_batch_size=0,
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
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a background job
    stop = threading.Event()

    def interrupt_once_training():  # after train installed its handler, not during a slow import
        t_end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < t_end and signal.getsignal(signal.SIGINT) is before:
            time.sleep(0.02)
        if not stop.wait(0.5):
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_once_training, daemon=True).start()
    try:
        out = train(cfg(corpus, tmp_path, max_steps=100000, max_seconds=120.0))
    finally:
        stop.set()
    assert out["interrupted"] == signal.SIGINT
    assert 0 < out["step"] < 100000
    assert load_checkpoint(out["checkpoint"])["step"] == out["step"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


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
    with pytest.raises(FileNotFoundError, match="--init_from: model 'nowhere' does not exist"):
        train(cfg(corpus, tmp_path / "f", init_from="nowhere"))


def test_cli_train_and_eval(corpus, tmp_path, capsys):
    from gpt2_fast.cli import main
    out = str(tmp_path / "run")
    args = ["train", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--seq_len=32",
            "--batch_size=2", "--max_steps=2", "--total_batch_size=0", f"--data={corpus}", f"--out_dir={out}",
            "--progress=false",
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


# -- the run folder: one run per folder, a lock, a log without duplicates ------------------------

def _cli(args, capsys):
    from gpt2_fast.cli import main
    code = main(["train", *args])
    return code, capsys.readouterr().err


def _tiny_args(corpus, out, *extra):
    return ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--seq_len=32", "--batch_size=2",
            "--total_batch_size=0", "--eval_interval=0", "--log_interval=1", "--progress=false", "--plot=false",
            "--device=cpu", f"--data={corpus}", f"--out={out}", *extra]


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_fresh_run_refuses_an_earlier_runs_folder(corpus, tmp_path, capsys):
    """Issue 14.1: a second, shorter run into a folder with an older run's checkpoints."""
    out = str(tmp_path / "run")
    assert _cli(_tiny_args(corpus, out, "--max_steps=4", "--ckpt_interval=2"), capsys)[0] == 0
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = sorted(os.listdir(out))
    code, err = _cli(_tiny_args(corpus, out, "--max_steps=2"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"gpt2-fast train: error: run folder {out} is not empty") and "--overwrite" in err
    assert sorted(os.listdir(out)) == before  # nothing touched
    code, err = _cli(_tiny_args(corpus, out, "--max_steps=2", "--overwrite"), capsys)
    assert code == 0 and f"checkpoint {out}/ckpt_00000002.pt" in err
    assert sorted(os.listdir(out)) == ["ckpt_00000002.pt", "config.json", "log.jsonl", "notes.txt"]
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert json.load(open(os.path.join(out, "config.json")))["train"]["max_steps"] == 2


def test_resume_drops_log_records_past_the_checkpoint_and_raises_max_steps(corpus, tmp_path):
    c = cfg(corpus, tmp_path, max_steps=6, warmup_steps=1, ckpt_interval=2, keep_last=5)
    train(c)
    os.unlink(tmp_path / "ckpt_00000006.pt")  # as if killed after logging step 6, before its checkpoint
    os.unlink(tmp_path / "ckpt_00000004.pt")
    out = train(cfg(corpus, tmp_path, max_steps=10, warmup_steps=1, ckpt_interval=2, keep_last=5, resume="auto"))
    assert out["step"] == 10
    log = _log(tmp_path)
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == list(range(1, 11))  # 3..6 once each, from the resumed run
    assert [r for r in log if r["kind"] == "resume"][0]["step"] == 2
    lrs = {r["step"]: r["lr"] for r in log if r["kind"] == "train"}
    # update 2 (0-based) continues from the rate the 6-step schedule had there, then decays to min_lr
    assert lrs[3] == pytest.approx(lr_at(c, 2)) and lrs[3] < c.lr
    assert all(lrs[s] > lrs[s + 1] for s in range(3, 10))
    assert lrs[10] == pytest.approx(lr_at(dataclasses_replace(c, max_steps=10), 9, {"step": 2, "lr": lr_at(c, 2)}))
    assert lr_at(c, 10, {"step": 2, "lr": lr_at(c, 2)}) == pytest.approx(c.min_lr)


def dataclasses_replace(c, **kw):
    import dataclasses
    return dataclasses.replace(c, **kw)


def test_resume_from_an_older_checkpoint_refuses_newer_ones(corpus, tmp_path):
    train(cfg(corpus, tmp_path, max_steps=4, ckpt_interval=2))
    with pytest.raises(ValueError, match=r"holds checkpoints newer than step 2 \(ckpt_00000004.pt\)"):
        train(cfg(corpus, tmp_path, max_steps=4, resume=str(tmp_path / "ckpt_00000002.pt")))
    assert os.path.exists(tmp_path / "ckpt_00000004.pt")


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(corpus, tmp_path):
    import socket
    import subprocess
    import sys
    from gpt2_fast.run_dir import LOCK, RunDirError
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "x"}))
    with pytest.raises(RunDirError, match=f"in use by another training run \\(pid {os.getppid()}"):
        train(cfg(corpus, tmp_path, max_steps=1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "x"}))
    assert train(cfg(corpus, tmp_path, max_steps=1))["step"] == 1
    assert not os.path.exists(tmp_path / LOCK)  # released at the end


# -- knobs ---------------------------------------------------------------------------------------

def test_total_batch_size_derives_grad_accum(corpus, tmp_path, capsys):
    c = TrainConfig(**{**TINY, "total_batch_size": 256})
    assert (c.accum_steps(1), c.accum_steps(2), c.tokens_per_step(2)) == (4, 2, 256)
    with pytest.raises(ValueError, match=r"total_batch_size 256 is not a multiple of .* 3 process\(es\) = 192 "
                                         r"tokens; use e.g. 192 or 384"):
        c.accum_steps(3)
    with pytest.raises(ValueError, match="give total_batch_size .* or grad_accum"):
        TrainConfig(total_batch_size=256, grad_accum=2)
    a = train(cfg(corpus, tmp_path / "a", max_steps=2, total_batch_size=128))
    b = train(cfg(corpus, tmp_path / "b", max_steps=2, grad_accum=2))
    assert a["tokens_per_step"] == 128 and "128 tokens/step (2 x 32 x 2 accum x 1)" in capsys.readouterr().err
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    code, err = _cli(_tiny_args(corpus, tmp_path / "c", "--total_batch_size=100"), capsys)
    assert code == 2 and err.startswith("gpt2-fast train: error: total_batch_size 100 is not a multiple")


def test_resume_compares_the_global_batch():
    from gpt2_fast.train import resume_mismatch
    now = TrainConfig(**{**TINY, "batch_size": 4})                     # 4 x 32 x 1 x 1 = 128 tokens
    two_ranks = {**now.to_dict(), "batch_size": 2}                       # saved: 2 x 32 x 1 x 2 ranks
    assert resume_mismatch(two_ranks, 2, now, 1) == []
    halved = resume_mismatch(now.to_dict(), 2, now, 1)                   # saved 256 tokens, now 128
    assert len(halved) == 1 and "tokens per optimizer step: checkpoint 256 (4 x 32 x 1 accum x 2" in halved[0]
    by_total = TrainConfig(**{**TINY, "total_batch_size": 256})
    assert resume_mismatch({**now.to_dict()}, 2, by_total, 1) == []     # 2 x 128 == 4 accum x 64
    assert resume_mismatch({**now.to_dict(), "lr": 5.0}, 1, now, 1)[0].startswith("lr: checkpoint 5.0")


def test_grad_checkpointing_gives_the_same_gradients():
    from gpt2_fast.model import GPT
    torch.manual_seed(0)
    model = GPT(TrainConfig(**{**TINY, "dropout": 0.1}).model_config()).train()
    x = torch.randint(0, 50257, (2, 32))
    grads = []
    for recompute in (False, True):
        model.grad_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _, loss = model(x, x, return_logits=False)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_keep_best_and_eval_without_a_val_split(corpus, tmp_path, capsys):
    out = train(cfg(corpus, tmp_path / "a", max_steps=4, eval_interval=2, grad_checkpointing=True))
    vals = {r["step"]: r["val_loss"] for r in out["history"] if r["kind"] == "eval"}
    best = load_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert best["step"] == min(vals, key=vals.get) and "optimizer" not in best
    assert best["metrics"]["best_val_loss"] == min(vals.values()) == out["best_val_loss"]
    from gpt2_fast.load import load_model
    assert load_model(str(tmp_path / "a" / "best.pt")).config.n_layer == 2
    with pytest.raises(ValueError, match="best.pt holds the weights only"):
        train(cfg(corpus, tmp_path / "a", max_steps=5, eval_interval=2, resume=str(tmp_path / "a" / "best.pt")))
    # issue 14.11: no val split: fine with eval_interval=0, said once otherwise
    import shutil
    nov = tmp_path / "noval"
    shutil.copytree(corpus, nov)
    for p in nov.glob("*_val_*.bin"):
        p.unlink()
    assert train(cfg(str(nov), tmp_path / "b", max_steps=1, eval_interval=0))["step"] == 1
    capsys.readouterr()
    out = train(cfg(str(nov), tmp_path / "c", max_steps=2, eval_interval=1))
    assert out["val_loss"] is None and "has no validation tokens (0-token val split)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the val split has .* tokens, fewer than one batch.*--eval_interval=0"):
        train(cfg(corpus, tmp_path / "d", max_steps=1, eval_interval=1, batch_size=200))
    assert train(cfg(corpus, tmp_path / "e", max_steps=1, eval_interval=0, batch_size=200))["step"] == 1


def test_tied_embedding_is_stored_once(corpus, tmp_path):
    from gpt2_fast.checkpoint import model_from_state, model_state_dict
    out = train(cfg(corpus, tmp_path, max_steps=1))
    state = load_checkpoint(out["checkpoint"])
    assert "lm_head.weight" not in state["model"] and "transformer.wte.weight" in state["model"]
    model = model_from_state(state)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, state["model"]["transformer.wte.weight"])
    # the file holds the weights once: model bytes + 2 Adam moments, not 4 copies of wte
    wte = state["model"]["transformer.wte.weight"].numel() * 4
    model_bytes = sum(v.numel() * v.element_size() for v in model_state_dict(model).values())
    assert os.path.getsize(out["checkpoint"]) < 3 * model_bytes + wte // 4


def test_no_host_sync_between_log_steps(corpus, tmp_path, monkeypatch):
    """The loss and grad norm are read (float()) at log steps only: 10 steps, log_interval 5."""
    calls = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append(1) or real(t))
    out = train(cfg(corpus, tmp_path, max_steps=10, log_interval=5))
    logged = [r["step"] for r in out["history"] if r["kind"] == "train"]
    assert logged == [1, 5, 10]
    assert len(calls) == 2 * len(logged)  # loss + grad norm per record


def test_tensorboard_and_wandb_when_asked_for(corpus, tmp_path, monkeypatch, capsys):
    import builtins
    import sys
    import types
    real_import = builtins.__import__

    def no_tb(name, *a, **kw):
        if name in ("torch.utils.tensorboard", "wandb"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    train(cfg(corpus, tmp_path / "a", max_steps=1, tensorboard=True, wandb=True))
    err = capsys.readouterr().err
    assert "--tensorboard: tensorboard is not installed (pip install tensorboard)" in err
    assert "--wandb: wandb is not installed (pip install wandb)" in err
    monkeypatch.setattr(builtins, "__import__", real_import)
    seen = []
    run = types.SimpleNamespace(log=lambda d, step: seen.append((step, d)), finish=lambda: seen.append("finish"))
    fake = types.SimpleNamespace(init=lambda **kw: seen.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(cfg(corpus, tmp_path / "b", max_steps=2, wandb=True, wandb_project="p"))
    assert seen[0]["project"] == "p" and seen[0]["name"] == "b" and seen[0]["config"]["train"]["max_steps"] == 2
    assert [s for s, d in seen[1:-1]] == [1, 2] and "train/loss" in seen[1][1] and seen[-1] == "finish"


def test_time_schedule_decays_over_the_budget():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10**6, max_seconds=100.0, time_schedule=True)
    assert lr_at(c, 1, elapsed=0.0) == pytest.approx(1.0)
    assert lr_at(c, 0, elapsed=0.0) == pytest.approx(0.5)  # warmup: 2 steps, or 5 s (5% of 100 s)
    assert lr_at(c, 0, elapsed=5.0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.05)))
    assert lr_at(c, 5, elapsed=50.0) == pytest.approx(0.55)
    assert lr_at(c, 6, elapsed=150.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="time_schedule needs max_seconds"):
        TrainConfig(time_schedule=True)


def test_cli_out_alias_init_from_a_folder_device_and_help(corpus, tmp_path, capsys):
    first = str(tmp_path / "first")
    assert _cli(_tiny_args(corpus, first, "--max_steps=1"), capsys)[0] == 0
    args = [a for a in _tiny_args(corpus, "x", "--max_steps=1") if not a.startswith("--out=")]
    code, err = _cli(args + [f"--out_dir={tmp_path / 'second'}", f"--init_from={first}"], capsys)
    assert code == 0 and os.path.exists(tmp_path / "second" / "ckpt_00000001.pt"), err
    if not torch.cuda.is_available():
        code, err = _cli(_tiny_args(corpus, tmp_path / "c", "--device=cuda"), capsys)
        assert code == 2 and err.count("\n") == 1
        assert err.startswith("gpt2-fast train: error: --device cuda: CUDA is not available here")
    code, err = _cli(_tiny_args(corpus, tmp_path / "d", "--device=gpu"), capsys)
    assert code == 2 and "--device 'gpu' is not a device" in err
    from gpt2_fast.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in sub._actions:
        assert action.help and not action.help.startswith("(default"), action.option_strings

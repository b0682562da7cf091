"""torchrun DDP on CPU (gloo): 2 ranks follow the single-process loss curve with the same global
batch, through the real entry point `torchrun -m gpt2_fast.train`."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2_fast import data as D
from gpt2_fast.checkpoint import load_checkpoint
from gpt2_fast.config import TrainConfig
from gpt2_fast.train import train

COMMON = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, max_steps=5, lr=1e-2, min_lr=1e-3,
              warmup_steps=2, grad_accum=2, total_batch_size=0, eval_interval=0, eval_iters=2, log_interval=1, ckpt_interval=0,
              progress=False, plot=False, tensorboard=False, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    with gzip.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        (root / "kjv.txt").write_text(f.read(100_000), encoding="utf-8")
    D.prepare([str(root / "kjv.txt")], str(root / "data"), val_fraction=0.1, progress=False)
    return str(root / "data")


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["kind"] == "train"]


def _torchrun(corpus, out, *extra):
    args = [f"--{k}={v}" for k, v in COMMON.items()] + ["--batch_size=2", f"--data={corpus}",
                                                        f"--out_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPT2_FAST_POISON": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gpt2_fast.train", "gpt2", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_ranks_match_one_process(corpus, tmp_path):
    single = train(TrainConfig(**COMMON, batch_size=4, data=corpus, out_dir=str(tmp_path / "single")))
    _torchrun(corpus, tmp_path / "ddp")
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    assert a[-1] < a[0] - 1.0
    wa = load_checkpoint(single["checkpoint"])
    wb = load_checkpoint(str(tmp_path / "ddp" / "ckpt_00000005.pt"))
    assert len(wb["rng"]) == 2 and wb["data"] == wa["data"]
    for k, v in wa["model"].items():  # float sums in another order; Adam magnifies it on rare rows
        torch.testing.assert_close(wb["model"][k], v, rtol=1e-3, atol=5e-4, msg=k)
        assert (wb["model"][k] - v).abs().mean() < 1e-6, k
    # only rank 0 wrote: one log, one checkpoint
    assert sorted(os.listdir(tmp_path / "ddp")) == ["ckpt_00000005.pt", "config.json", "log.jsonl"]


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes(corpus, tmp_path):
    """--fsdp (FSDP2 fully_shard, gloo on CPU): same loss curve as one process; a run stopped at
    step 2 and resumed (full state dicts gathered to rank 0) ends where the straight run ends."""
    train(TrainConfig(**COMMON, batch_size=4, data=corpus, out_dir=str(tmp_path / "single")))
    _torchrun(corpus, tmp_path / "fsdp", "--fsdp")
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
    _torchrun(corpus, tmp_path / "part", "--fsdp", "--max_steps_this_run=2")
    _torchrun(corpus, tmp_path / "part", "--fsdp", "--resume=auto")
    wa = load_checkpoint(str(tmp_path / "fsdp" / "ckpt_00000005.pt"))["model"]
    wb = load_checkpoint(str(tmp_path / "part" / "ckpt_00000005.pt"))["model"]
    for k, v in wa.items():
        torch.testing.assert_close(wb[k], v, rtol=1e-4, atol=1e-5, msg=k)

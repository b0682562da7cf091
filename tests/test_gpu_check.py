"""bench/gpu_check.py, the Python half of bench/gpu_check.sh: the sha without .git, the A/B plan
(every choices.py row gets a benchmark) and how a side's outcome is classified. The whole script
runs in CI as a dry run on CPU (.ci/run: GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh)."""
import importlib.util
import json
import os
import subprocess

import pytest

from gpt2_fast.choices import CHOICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def test_sha_from_env_then_file_then_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_FAST_GIT_SHA", "abc123")
    assert gc.git_sha(str(tmp_path)) == "abc123"
    monkeypatch.delenv("GPT2_FAST_GIT_SHA")
    assert gc.git_sha(str(tmp_path)) == "unknown"  # no .git, no file
    (tmp_path / ".git_sha").write_text("def456\n")
    assert gc.git_sha(str(tmp_path)) == "def456"


def test_every_choice_has_a_benchmark():
    for name, c in CHOICES.items():
        args = gc.bench_args(name)
        assert args and args[0] in ("kernels", "decode"), name
        assert len(c.options) >= 2, name


@pytest.mark.parametrize("rc,text,value,status", [
    (0, "", 1.5, "ok"),
    (124, "", None, "timed out"),
    (1, "raise NotImplementedError('fused decode step')", None, "not implemented"),
    (1, "RuntimeError: the CUDA graph runner needs CUDA", None, "n/a here"),
    (2, "usage: gpt2-fast bench decode ... error: unrecognized arguments: --int9", None, "FAILED rc=2"),
    (0, "", None, "FAILED rc=0"),  # ran but measured nothing for ours
])
def test_side_status(rc, text, value, status):
    assert gc._side_status(rc, text, value) == status


def test_figure_reads_ours_from_each_benchmark():
    k = {"rows": [{"provider": "torch", "status": "ok", "ms": 2.0},
                  {"provider": "triton", "status": "ok", "ms": 1.25, "value": 3.0, "metric": "TFLOP/s"}]}
    assert gc._figure(k, "kernels")[0] == 1.25
    assert gc._figure({"rows": [{"provider": "triton", "status": "error: NotImplementedError"}]},
                      "kernels") == (None, "error: NotImplementedError")
    d = {"rows": [{"peer": "hf", "ms_per_token_p50": 9.0}, {"peer": "ours", "ms_per_token_p50": 4.5}]}
    assert gc._figure(d, "decode")[0] == 4.5
    assert gc._figure({}, "decode") == (None, "no result file")


def test_ab_table_marks_the_fastest_when_every_side_measured(tmp_path):
    ab = {"decode_step": {"env": "GPT2_FAST_DECODE_STEP", "default": "unfused", "sides": {
        "unfused": {"status": "ok", "value": 4.0, "figure": "4.000 ms/token (p50)"},
        "fused": {"status": "ok", "value": 3.0, "figure": "3.000 ms/token (p50)"}}},
        "int8_matmul": {"env": "GPT2_FAST_INT8_MATMUL", "default": "gemv", "sides": {
            "gemv": {"status": "ok", "value": 1.0, "figure": "1 ms"},
            "dequant": {"status": "not implemented", "value": None}}}}
    (tmp_path / "ab.json").write_text(json.dumps(ab))
    lines = gc.ab_lines(str(tmp_path))
    fused = next(ln for ln in lines if "=fused" in ln)
    assert "<- fastest" in fused and "<- fastest" not in next(ln for ln in lines if "=unfused" in ln)
    assert not any("<- fastest" in ln for ln in lines if "INT8" in ln)  # one side unmeasured: no verdict
    assert "not implemented" in next(ln for ln in lines if "=dequant" in ln)


def test_script_says_no_gpu_and_exits_0_without_one(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "60", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GPU_CHECK_DRY_RUN", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "NO GPU HERE" in proc.stdout and "nothing was built or measured on a GPU" in proc.stdout
    assert os.listdir(tmp_path) == []  # without a GPU it writes nothing

"""`gpt2-fast bench kernels|decode|train` in quick mode on CPU (what CI runs), the result files,
the arithmetic behind the reported figures and bad input (bench/gpu_check.sh: tests/test_gpu_check.py)."""
import csv
import glob
import json
import math
import os

import pytest
import torch

from gpt2_fast.benchmarks import common, kernels, summary
from gpt2_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(folder, pattern):
    paths = glob.glob(os.path.join(folder, pattern))
    assert len(paths) == 1, f"expected one {pattern} in {folder}, found {paths}"
    return paths[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the three commands once, quick, on CPU, into one folder; keep their printed output."""
    out = str(tmp_path_factory.mktemp("bench"))
    printed = {}
    import contextlib
    import io
    for name, argv in {
        "kernels": ["kernels", "--ops", "add_layer_norm", "--modes", "fwd,bwd",
                    "--providers", "torch,torch-native,compile,liger,triton,cuda,sdpa-math"],
        "decode": ["decode", "--prompt-len", "8", "--new-tokens", "5"],
        "train": ["train", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "1",
                  "--peers", "ours,torch-eager,hf,torch-compile"],
    }.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["bench"] + argv + ["--device", "cpu", "--out", out])
        printed[name] = buf.getvalue()
        assert rc == 0, f"bench {name} returned {rc}:\n{printed[name]}"
    return out, printed


def _check_stamp(st):
    for key in ("date_utc", "git_sha", "device", "torch", "triton", "python"):
        assert st.get(key), f"stamp lacks {key}: {st}"
    assert st["device_type"] == "cpu" and "CPU figures" in st["note"]


def test_kernels_quick(results):
    out, printed = results
    assert "CPU FIGURES" in printed["kernels"]
    data = json.load(open(_one(out, "kernels-*.json")))
    _check_stamp(data["stamp"])
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops_fp32"] > 0
    rows = {(r["op"], r["mode"], r["provider"]): r for r in data["rows"]}
    # the requested op alone (not its group), only the requested modes, no SDPA for a LayerNorm
    assert {(op, m) for op, m, _ in rows} == {("add_layer_norm", "fwd"), ("add_layer_norm", "bwd")}
    assert not any(p == "sdpa-math" for _, _, p in rows)
    for (op, mode, prov), r in rows.items():
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], r
            continue
        assert r["ms"] > 0 and r["p10_ms"] <= r["ms"] <= r["p90_ms"]
        case = kernels.Case(op, mode, dict(preset="tiny", N=128, C=96), torch.float32)
        metric, amount = kernels.work(case)
        assert (r["metric"], r["work"]) == (metric, amount)
        assert math.isclose(r["value"], amount / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["pct_ceiling"], 100 * r["value"] / data["ceilings"]["copy_gbps"], rel_tol=1e-9)
        assert r["max_err"] < 1e-4, f"{prov} {op} {mode} differs from the reference by {r['max_err']}"
        torch_ms = rows[(op, mode, "torch")]["ms"]
        assert math.isclose(r["speedup_vs_torch"], torch_ms / r["ms"], rel_tol=1e-9)
    assert rows[("add_layer_norm", "fwd", "torch")]["status"] == "ok"
    # reads x and the residual, writes s and y, fp32
    assert rows[("add_layer_norm", "fwd", "torch")]["work"] == 4 * 128 * 96 * 4
    assert "--compile" in rows[("add_layer_norm", "fwd", "compile")]["reason"]
    assert "CUDA" in rows[("add_layer_norm", "fwd", "cuda")]["reason"]
    if rows[("add_layer_norm", "fwd", "triton")]["status"] == "ok":
        assert "TRITON_INTERPRET" in rows[("add_layer_norm", "fwd", "triton")]["detail"]

    with open(_one(out, "kernels-*.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("# date_utc:") and any(line.startswith("# device:") for line in lines)
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(table) == len(data["rows"]) and set(kernels.COLUMNS) <= set(table[0])
    with open(_one(out, "kernels-*.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_decode_quick(results):
    out, printed = results
    assert "CPU FIGURES" in printed["decode"]
    data = json.load(open(_one(out, "decode-tiny-*.json")))
    _check_stamp(data["stamp"])
    assert "random weights" in data["weights"]
    cfg = data["config"]
    rows = {r["peer"]: r for r in data["rows"]}
    # quick CPU mode does not compile: labelled eager; ONNX Runtime and CTranslate2 run when installed
    assert set(rows) == {"ours", "hf", "eager-static", "ort", "ct2"}
    assert "torch.compile skipped" in rows["eager-static"]["detail"]
    for peer, module in (("ort", "onnxruntime"), ("ct2", "ctranslate2")):
        r = rows.pop(peer)
        if r["status"] == "skipped":  # only for want of the package
            assert module in r["reason"] and ".[peers]" in r["reason"], r
        else:
            assert r["same_tokens"] is not None and r["export_s"] > 0 and "thread(s)" in r["detail"], r
            rows[peer] = r
    for peer, r in rows.items():
        assert r["status"] == "ok", r
        assert r["decode_steps"] == data["new_tokens"] - 1  # the first token's time is the TTFT
        assert 0 < r["ms_per_token_p50"] <= r["ms_per_token_p90"] and r["ttft_ms"] > 0
        assert math.isclose(r["tokens_per_s"], 1e3 / r["ms_per_token_mean"], rel_tol=1e-9)
        live = data["prompt_len"] + data["new_tokens"] / 2
        kv = 2 * cfg["n_layer"] * 1 * cfg["n_head"] * live * (cfg["n_embd"] // cfg["n_head"]) * 4
        assert math.isclose(r["bytes_per_token"], data["weight_bytes"] + kv, rel_tol=1e-9)
        assert math.isclose(r["achieved_gbps"], r["bytes_per_token"] / r["ms_per_token_mean"] / 1e6, rel_tol=1e-9)
    # every parameter once (tied wte/lm_head once) except wpe, fp32
    C, V = cfg["n_embd"], cfg["vocab_size"]
    per_layer = 12 * C * C + 13 * C
    assert data["weight_bytes"] == 4 * (V * C + cfg["n_layer"] * per_layer + 2 * C)
    assert "same_tokens" in rows["hf"] and rows["eager-static"]["same_tokens"] is not None


def test_train_quick(results):
    out, printed = results
    assert "CPU FIGURES" in printed["train"]
    data = json.load(open(_one(out, "train-tiny-*.json")))
    _check_stamp(data["stamp"])
    rows = {r["peer"]: r for r in data["rows"]}
    assert rows["torch-compile"]["status"] == "skipped" and "--compile" in rows["torch-compile"]["reason"]
    for peer in ("ours", "torch-eager", "hf"):
        r = rows[peer]
        assert r["status"] == "ok", r
        assert math.isclose(r["tokens_per_s"], 1 * 16 / (r["ms_per_step"] * 1e-3), rel_tol=1e-6)
        assert abs(r["loss_first"] - math.log(50257)) < 1.0  # random init: about ln(vocab)
        cfg = data["config"]
        fpt = 6 * r["n_params"] + 12 * cfg["n_layer"] * cfg["n_embd"] * 16
        assert math.isclose(r["model_tflops"], r["tokens_per_s"] * fpt / 1e12, rel_tol=1e-9)
        assert math.isclose(r["mfu_measured_pct"], 100 * r["model_tflops"] / data["measured_matmul_tflops"],
                            rel_tol=1e-9)
        assert r["mfu_datasheet_pct"] is None  # no datasheet peak for a CPU


def test_summary_merges(results, capsys):
    out, _ = results
    assert summary.main([out, "--no-write"]) == 0
    text = capsys.readouterr().out
    assert "kernels (largest shape" in text and "decode (batch 1)" in text and "train (tiny" in text
    merged = summary.collect(out)
    assert merged["kernels"]["kind"] == "kernels" and "tiny" in merged["decode"]
    assert merged["train"]["model"] == "tiny"


@pytest.mark.parametrize("argv,expect", [
    (["kernels", "--ops", "nope"], "--ops must be a comma list of"),
    (["kernels", "--providers", "torch,fast"], "--providers must be a comma list of"),
    (["decode", "--model", "/no/such/checkpoint"], "--model must be a preset"),
    (["decode", "--new-tokens", "1"], "--new-tokens >= 2"),
    (["train", "--model", "gpt3"], "--model must be one of"),
    (["train", "--peers", "ours,jax"], "--peers must be a comma list of"),
    (["train", "--steps", "0"], "--steps, --warmup >= 1"),
    (["kernels", "--device", "cuda:0"] if not torch.cuda.is_available() else ["kernels", "--device", "tpu"],
     "--device"),
])
def test_bad_input_is_a_clear_error(argv, expect, capsys):
    assert main(["bench"] + argv + ["--no-write"]) == 2
    assert expect in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["bench", "train", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-fast bench: error: --out ") and "not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "f").read_text() == "mine"


def test_common_helpers():
    assert common.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert common.quantile([1.0, 2.0], 0.9) == pytest.approx(1.9)
    with pytest.raises(ValueError):
        common.quantile([], 0.5)
    assert common.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert common.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert common.datasheet_peak_tflops("Some CPU") is None
    assert common.slug("NVIDIA H100 80GB HBM3 (x/y)") == "NVIDIA-H100-80GB-HBM3-x-y"
    t = common.bench(lambda: torch.ones(8).sum(), torch.device("cpu"), warmup_ms=1, rep_ms=2, min_reps=4)
    assert t["reps"] >= 4 and 0 < t["p10_ms"] <= t["ms"] <= t["p90_ms"]
    table = common.format_table([dict(a="x", b=1.5), dict(a="yy", b=None)], (("a", "A"), ("b", "B")))
    assert table.splitlines()[0].split() == ["A", "B"] and table.splitlines()[3].split() == ["yy", "-"]
    assert common.IMPOSSIBLE_NOTE not in table


def test_impossible_percentages_are_marked(tmp_path):
    rows = [dict(peer="ours", mfu_measured_pct=602.0, pct_copy_bw=40.0), dict(peer="hf", mfu_measured_pct=99.0)]
    table = common.format_table(rows, (("peer", "peer"), ("mfu_measured_pct", "MFU"), ("pct_copy_bw", "%")))
    assert "602!" in table and "99" in table and "99!" not in table and "40!" not in table
    assert table.splitlines()[-1] == common.IMPOSSIBLE_NOTE
    path = common.write_json(str(tmp_path / "r.json"), {"rows": rows})
    saved = json.load(open(path))["rows"]
    assert "mfu_measured_pct 602% > 100%: impossible" in saved[0]["suspect"] and "suspect" not in saved[1]
    lines = summary.train_lines({"model": "tiny", "batch": 1, "seq": 8, "rows": [
        dict(peer="ours", status="ok", tokens_per_s=1.0, mfu_datasheet_pct=None, mfu_measured_pct=170.0)]})
    assert "170!" in "\n".join(lines) and common.IMPOSSIBLE_NOTE in "\n".join(lines)

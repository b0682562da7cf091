"""gpt2_fast/ops.py: "auto" honours the committed table of GPU measurements
(bench/results/cuda-op-choice.json), measured entries only, falling back to AUTO_ORDER."""
import json

import pytest

from gpt2_fast import ops


@pytest.fixture
def table(tmp_path, monkeypatch):
    """write(entries) -> points OP_CHOICE_FILES["cuda"] at a temp table; caches cleared around."""
    def clear():
        ops.measured_choices.cache_clear()
        ops.resolve.cache_clear()
        ops._KERNELS.clear()

    def write(entries: dict):
        path = tmp_path / "cuda-op-choice.json"
        path.write_text(json.dumps(entries))
        monkeypatch.setitem(ops.OP_CHOICE_FILES, "cuda", str(path))
        clear()
    yield write
    clear()


def test_committed_table_parses_and_changes_nothing_today():
    ops.measured_choices.cache_clear()
    with open(ops.OP_CHOICE_FILES["cuda"]) as f:
        entries = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    assert set(entries) == set(ops.OPS) | {"attention_bwd"}
    assert ops.measured_choices("cuda") == {}, "no GPU measurement is committed yet"
    assert ops.measured_choices("cpu") == {}


def test_measured_entries_are_honoured_and_null_ones_ignored(table, monkeypatch):
    monkeypatch.delenv("GPT2_FAST_BACKEND", raising=False)
    monkeypatch.delenv("GPT2_FAST_ATTN_FWD", raising=False)
    default = {op: ops.resolve(op, "auto", "cuda")[0] for op in ops.OPS}
    assert default["layer_norm"] == "triton"       # today's AUTO_ORDER on CUDA
    table({"layer_norm": {"backend": "torch", "measured": "bench/results/x.json"},
           "bias_gelu": {"backend": "torch", "measured": None},
           "attention": {"backend": "sdpa", "measured": "bench/results/y.json"}})
    assert ops.measured_choices("cuda") == {"layer_norm": "torch", "attention": "sdpa"}
    assert ops.resolve("layer_norm", "auto", "cuda")[0] == "torch"
    assert ops.resolve("attention", "auto", "cuda") == ("sdpa", ops.sdpa_attention)
    for op in set(ops.OPS) - {"layer_norm", "attention"}:
        assert ops.resolve(op, "auto", "cuda")[0] == default[op], op
    assert ops.resolve("layer_norm", "triton", "cuda")[0] == "triton"   # a named backend wins
    assert ops.dispatch("auto").names("cuda")["layer_norm"] == "torch"
    monkeypatch.setenv("GPT2_FAST_ATTN_FWD", "triton")                  # the env choice wins
    ops.resolve.cache_clear()
    assert ops.resolve("attention", "auto", "cuda")[0] == default["attention"]


def test_unusable_measured_backend_falls_back_to_the_order(table, monkeypatch):
    table({"layer_norm": {"backend": "cpp", "measured": "bench/results/x.json"}})  # cpp: CPU only
    assert ops.resolve("layer_norm", "auto", "cuda")[0] == "triton"


def test_measured_attention_bwd_side_is_set_once(table, monkeypatch):
    fa = pytest.importorskip("gpt2_fast.kernels.flash_attention")
    monkeypatch.delenv("GPT2_FAST_ATTN_BWD", raising=False)
    monkeypatch.setattr(fa, "BWD_VARIANT", fa.BWD_VARIANT)             # restored after the test
    table({"attention_bwd": {"backend": "sdpa", "measured": "bench/results/z.json"}})
    ops._resolve_table("auto", "cuda", "triton")
    assert fa.BWD_VARIANT == "sdpa"
    monkeypatch.setattr(fa, "BWD_VARIANT", "triton_det")
    monkeypatch.setenv("GPT2_FAST_ATTN_BWD", "triton_atomic")           # forced: the table yields
    ops._resolve_table("auto", "cuda", "triton")
    assert fa.BWD_VARIANT == "triton_det"


def test_info_reports_the_measured_attention_sides(table, monkeypatch):
    from gpt2_fast import info
    for env in ("GPT2_FAST_BACKEND", "GPT2_FAST_ATTN_FWD", "GPT2_FAST_ATTN_BWD"):
        monkeypatch.delenv(env, raising=False)
    table({"attention": {"backend": "sdpa", "measured": "bench/results/y.json"}})
    assert "attention=sdpa (torch SDPA forward and backward)," in info.picks_line("cuda")
    fa = pytest.importorskip("gpt2_fast.kernels.flash_attention")
    monkeypatch.setattr(fa, "BWD_VARIANT", fa.BWD_VARIANT)             # restored after the test
    table({"attention_bwd": {"backend": "sdpa", "measured": "bench/results/z.json"}})
    assert "attention=triton (backward: sdpa)," in info.picks_line("cuda")


@pytest.mark.parametrize("entry", [{"backend": "tensorrt", "measured": "f"}, "triton",
                                   {"backend": "sdpa", "measured": "f", "op": "layer_norm"}])
def test_bad_table_is_one_clear_error(table, entry):
    op = "layer_norm"
    table({op: entry})
    with pytest.raises(ValueError, match="cuda-op-choice.json: entry 'layer_norm'"):
        ops.measured_choices("cuda")

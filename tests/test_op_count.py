"""Kernel launches per decode step (gpt2_fast/benchmarks/op_count.py), pinned: a count is
deterministic, so a change that adds launches to a decode step fails here. Counted on CPU with the
Triton backend under the interpreter (the GPU path's ops); see `gpt2-fast bench decode --count-ops`."""
import pytest
import torch

from gpt2_fast import GPT, GPTConfig
from gpt2_fast.benchmarks.op_count import counting, per_layer_and_fixed

pytest.importorskip("triton")

# (step, sampling) -> (per layer, fixed) today. Unfused: linear 4, add 2 (kv_len, residual),
# layer_norm 2, index_copy_ 2 (k and v), decode_attention 1 (+1 combine kernel when it splits,
# as on a GPU at long context), bias_gelu 1 per layer; the sampler's elementwise hash, topk and
# sort are the fixed part. Fused: qkv GEMV, attention, 3 GEMVs per layer; embed, LM head, sampler,
# pos += 1 fixed (gpt2_fast/decode_fused.py).
PINNED = {
    ("unfused", "greedy"): (12, 17),
    ("unfused", "sample"): (12, 87),
    ("fused", "greedy"): (5, 4),
    ("fused", "sample"): (5, 4),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=32,
                         backend="triton")).eval()


@pytest.mark.parametrize("step,sampling", list(PINNED))
def test_launches_per_step_are_pinned(model, step, sampling):
    r = per_layer_and_fixed(model, step, sampling)
    per_layer, fixed = PINNED[(step, sampling)]
    assert r["host_reads"] == {}, f"the {step} step reads from the host: {r['host_reads']}"
    assert r["linear"], r
    grew = f"{step}/{sampling} grew: {r['per_layer']}/layer + {r['fixed']} fixed > pinned {per_layer} + {fixed}"
    assert r["per_layer"] <= per_layer and r["fixed"] <= fixed, f"{grew}: {r['by_op']}"
    if step == "fused":
        assert (r["per_layer"], r["fixed"]) == (per_layer, fixed), r["by_op"]
        assert per_layer <= 6 and fixed <= 10          # the budget


def test_counter_counts_torch_ops_triton_launches_and_host_reads():
    from gpt2_fast.kernels import decode_gemv as G
    x = torch.randn(2, 8)
    with counting() as c:
        y = x.view(16)          # view: not a launch
        z = torch.empty(3)      # allocation: not a launch
        y = (x + 1).sum()       # 2 launches
        int(y)                  # a host read
        G.gemv(x, torch.randn(4, 8), z.new_empty(2, 4))  # 1 Triton launch (+1: randn)
    assert c.launches == {"add": 1, "sum": 1, "randn": 1, "triton._gemv_kernel": 1}, c.launches
    assert c.host_reads == {"_local_scalar_dense": 1}

"""kernels/decode_attention.py (flash-decoding) vs reference.decode_attention_ref.

Covers Tq = 1 (decode) and 3 (speculative verification) plus a prefill-sized Tq, ragged kv_len
per row, kv_start left padding, a row whose live range is empty, a query that sees no slot, a
cache length S that is not a multiple of BLOCK_N, the single-split path, more splits than live
blocks (empty splits), strided inputs as the model passes them, and CUDA-graph replay on CUDA.
"""
import os

import pytest
import torch

from gpt2_fast import poison
from gpt2_fast.reference import decode_attention_ref
from tolerance import assert_close_to_ref


def _skip_unless_triton(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before import (no GPU here)")


@pytest.fixture
def da(device):
    _skip_unless_triton(device)
    from gpt2_fast.kernels import decode_attention as mod
    return mod


def _inputs(B, H, Tq, S, D, dtype, device):
    q = torch.randn(B, H, Tq, D, device=device).to(dtype)
    k = torch.randn(B, H, S, D, device=device).to(dtype)
    v = torch.randn(B, H, S, D, device=device).to(dtype)
    return q, k, v


def _compare(o, q, k, v, kv_len, kv_start, scale=None, name="o"):
    ref_lo = decode_attention_ref(q, k, v, kv_len, kv_start, scale)
    ref_hi = decode_attention_ref(q, k, v, kv_len, kv_start, scale, upcast=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_close_to_ref(o, ref_hi, ref_lo, name)


# S = 75 is not a multiple of BLOCK_N (16 under the interpreter, 64 on CUDA). Rows: a short
# sequence, a full cache with left padding, an empty live range (kv_start == kv_len), and a
# sequence shorter than Tq (its first queries see nothing, when Tq = 3).
S = 75


def _lengths(Tq, device):
    kv_len = torch.tensor([Tq + 4, S, 40, 2], dtype=torch.int32, device=device)
    kv_start = torch.tensor([0, 19, 40, 0], dtype=torch.int32, device=device)
    return kv_len, kv_start


def test_poison_is_on():
    assert poison.ENABLED, "tests/conftest.py must set GPT2_FAST_POISON=1 before gpt2_fast is imported"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_matches_reference(da, device, Tq, dtype):
    q, k, v = _inputs(4, 2, Tq, S, 64, dtype, device)
    kv_len, kv_start = _lengths(Tq, device)
    o = da.decode_attention(q, k, v, kv_len, kv_start)
    _compare(o, q, k, v, kv_len, kv_start)
    assert torch.equal(o[2], torch.zeros_like(o[2])), "a row with an empty live range must give zeros"


@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_without_kv_start(da, device, Tq):
    q, k, v = _inputs(4, 2, Tq, S, 64, torch.float32, device)
    kv_len, _ = _lengths(Tq, device)
    _compare(da.decode_attention(q, k, v, kv_len, None), q, k, v, kv_len, None)


@pytest.mark.parametrize("num_splits", [1, 2, 12])
def test_decode_num_splits(da, device, num_splits):
    # 1: the split kernel writes o itself; 12: more splits than live blocks for most rows
    q, k, v = _inputs(4, 1, 3, S, 64, torch.float32, device)
    kv_len, kv_start = _lengths(3, device)
    o = da.decode_attention_fwd(q, k, v, kv_len, kv_start, 0.125, num_splits=num_splits)
    _compare(o, q, k, v, kv_len, kv_start, 0.125, f"o (num_splits={num_splits})")


@pytest.mark.parametrize("D", [32, 80])
def test_decode_head_dims(da, device, D):
    q, k, v = _inputs(4, 1, 1, S, D, torch.float32, device)
    kv_len, kv_start = _lengths(1, device)
    _compare(da.decode_attention(q, k, v, kv_len, kv_start), q, k, v, kv_len, kv_start)


@pytest.mark.parametrize("Tq,num_splits", [(20, 2), (70, 1)])
def test_decode_prefill_sized_queries(da, device, Tq, num_splits):
    # a cached prefill calls decode_attention with the whole prompt (left padded): any Tq works,
    # 70 spans two query blocks of 64
    B, H, Sb = 2, 1, 90
    q, k, v = _inputs(B, H, Tq, Sb, 64, torch.float32, device)
    kv_len = torch.tensor([Tq, Sb], dtype=torch.int32, device=device)
    kv_start = torch.tensor([5, 3], dtype=torch.int32, device=device)
    o = da.decode_attention_fwd(q, k, v, kv_len, kv_start, 0.125, num_splits=num_splits)
    _compare(o, q, k, v, kv_len, kv_start, 0.125)


def test_decode_model_layouts(da, device):
    """As the model calls it: q a transposed view of (B, T, H, D), the cache the first B rows of a
    larger static buffer, kv_len an expanded (stride 0) int32 tensor, kv_start int64."""
    B, H, Tq, D, Bmax = 3, 2, 1, 32, 5
    q = torch.randn(B, Tq, H, D, device=device).transpose(1, 2)
    k_buf = torch.randn(Bmax, H, S, D, device=device)
    v_buf = torch.randn(Bmax, H, S, D, device=device)
    k, v = k_buf[:B], v_buf[:B]
    kv_len = torch.tensor([50], dtype=torch.int32, device=device).expand(B)
    kv_start = torch.tensor([0, 7, 49], dtype=torch.int64, device=device)
    o = da.decode_attention(q, k, v, kv_len, kv_start, scale=0.2)
    _compare(o, q, k, v, kv_len, kv_start, 0.2)
    assert o.transpose(1, 2).is_contiguous(), "o should be a (B, H, T, D) view of (B, T, H, D) memory"


def test_choose_num_splits_fills_an_h100(da, monkeypatch):
    monkeypatch.setattr(da, "_sm_count", lambda index: 132)
    splits = da.choose_num_splits(1, 12, 1, 1024, torch.device("cuda", 0))   # GPT-2 small, batch 1
    assert 12 * splits >= 132 and splits <= triton_cdiv(1024, da.BLOCK_N)
    assert da.choose_num_splits(64, 12, 1, 1024, torch.device("cuda", 0)) == 1  # big batch: no split
    assert da.choose_num_splits(1, 12, 1, 8, torch.device("cuda", 0)) == 1      # tiny cache


def triton_cdiv(a, b):
    return -(-a // b)


def test_decode_opcheck(da, device):
    q, k, v = _inputs(2, 1, 1, 20, 32, torch.float32, device)
    kv_len = torch.tensor([20, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.gpt2_fast_triton.decode_attention, (q, k, v, kv_len, None, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


def test_decode_rejects_bad_inputs(da, device):
    q, k, v = _inputs(2, 1, 1, 20, 32, torch.float32, device)
    kv_len = torch.tensor([20, 9], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="int32 or int64"):
        da.decode_attention(q, k, v, kv_len.float())
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        da.decode_attention(q, k, v, kv_len[:1])
    with pytest.raises(ValueError, match=r"shape \(B, H, S, D\)"):
        da.decode_attention(q, k[:, :, :, :16], v, kv_len)
    with pytest.raises(TypeError, match="share a dtype"):
        da.decode_attention(q, k, v.half(), kv_len)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        da.decode_attention(q.long(), k, v, kv_len)
    with pytest.raises(TypeError, match="kv_start"):
        da.decode_attention(q, k, v, kv_len, [0, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay_follows_kv_len():
    from gpt2_fast.kernels import decode_attention as da
    device = torch.device("cuda")
    B, H, Sg, D = 2, 12, 1024, 64
    q, k, v = _inputs(B, H, 1, Sg, D, torch.bfloat16, device)
    kv_len = torch.tensor([1, 1], dtype=torch.int32, device=device)
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    da.decode_attention(q, k, v, kv_len, kv_start)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = da.decode_attention(q, k, v, kv_len, kv_start)
    for lens in ([5, 700], [1024, 4], [300, 301]):
        kv_len.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        _compare(o, q, k, v, kv_len, kv_start, name=f"graph replay, kv_len={lens}")

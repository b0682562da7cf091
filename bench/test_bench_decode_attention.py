"""Microbenchmark: one query over a full KV cache (flash-decoding): GB/s vs the copy bandwidth.

Providers, shapes and the bytes / FLOPs counted: gpt2_fast/benchmarks/kernels.py.
    pytest bench/test_bench_decode_attention.py --benchmark-json decode_attention.json
"""
import pytest

from gpt2_fast.benchmarks import kernels as K

DEVICE, QUICK, PARAMS = K.pytest_params(("decode_attention",))


@pytest.mark.parametrize("case,provider", PARAMS, ids=[K.param_id(x) for x in PARAMS])
def test_decode_attention(benchmark, ceilings, case, provider):
    K.pytest_bench(benchmark, case, provider, DEVICE, ceilings, QUICK)

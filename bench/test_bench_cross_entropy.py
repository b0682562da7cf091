"""Microbenchmark: softmax CE (GB/s) and the LM head fused with CE (TFLOP/s, peak memory).

Providers, shapes and the bytes / FLOPs counted: gpt2_fast/benchmarks/kernels.py.
    pytest bench/test_bench_cross_entropy.py --benchmark-json cross_entropy.json
"""
import pytest

from gpt2_fast.benchmarks import kernels as K

DEVICE, QUICK, PARAMS = K.pytest_params(("softmax_cross_entropy", "lm_head_cross_entropy"))


@pytest.mark.parametrize("case,provider", PARAMS, ids=[K.param_id(x) for x in PARAMS])
def test_cross_entropy(benchmark, ceilings, case, provider):
    K.pytest_bench(benchmark, case, provider, DEVICE, ceilings, QUICK)

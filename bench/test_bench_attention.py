"""Microbenchmark: causal attention fwd / bwd / fwd+bwd at T=1024 and 4096: TFLOP/s vs the matmul rate.

Providers, shapes and the bytes / FLOPs counted: gpt2_fast/benchmarks/kernels.py.
    pytest bench/test_bench_attention.py --benchmark-json attention.json
"""
import pytest

from gpt2_fast.benchmarks import kernels as K

DEVICE, QUICK, PARAMS = K.pytest_params(("attention",))


@pytest.mark.parametrize("case,provider", PARAMS, ids=[K.param_id(x) for x in PARAMS])
def test_attention(benchmark, ceilings, case, provider):
    K.pytest_bench(benchmark, case, provider, DEVICE, ceilings, QUICK)

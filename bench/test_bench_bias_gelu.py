"""Microbenchmark: bias + tanh-GELU on the MLP's (B*T, 4C) activations: GB/s vs the copy bandwidth.

Providers, shapes and the bytes / FLOPs counted: gpt2_fast/benchmarks/kernels.py.
    pytest bench/test_bench_bias_gelu.py --benchmark-json bias_gelu.json
"""
import pytest

from gpt2_fast.benchmarks import kernels as K

DEVICE, QUICK, PARAMS = K.pytest_params(("bias_gelu",))


@pytest.mark.parametrize("case,provider", PARAMS, ids=[K.param_id(x) for x in PARAMS])
def test_bias_gelu(benchmark, ceilings, case, provider):
    K.pytest_bench(benchmark, case, provider, DEVICE, ceilings, QUICK)

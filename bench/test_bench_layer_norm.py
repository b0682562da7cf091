"""Microbenchmark: LayerNorm and the fused residual add + LayerNorm: GB/s vs the copy bandwidth.

Providers, shapes and the bytes / FLOPs counted: gpt2_fast/benchmarks/kernels.py.
    pytest bench/test_bench_layer_norm.py --benchmark-json layer_norm.json
"""
import pytest

from gpt2_fast.benchmarks import kernels as K

DEVICE, QUICK, PARAMS = K.pytest_params(("layer_norm", "add_layer_norm"))


@pytest.mark.parametrize("case,provider", PARAMS, ids=[K.param_id(x) for x in PARAMS])
def test_layer_norm(benchmark, ceilings, case, provider):
    K.pytest_bench(benchmark, case, provider, DEVICE, ceilings, QUICK)

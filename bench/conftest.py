"""pytest setup for the kernel microbenchmarks: `pytest bench/ --benchmark-json out.json`.

Runs on its own (the root pyproject's testpaths cover tests/ only). On a CPU-only machine the
Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before any kernel is defined)
with tiny shapes: that checks the harness, it measures nothing. Choose what runs with
GPT2_FAST_BENCH_DEVICE / _QUICK / _PRESETS / _PROVIDERS / _SEQS (gpt2_fast.benchmarks.kernels.pytest_params).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("GPT2_FAST_POISON", None)  # poisoned (NaN-filled) outputs cost a fill: not here

import pytest  # noqa: E402

from gpt2_fast.benchmarks import common  # noqa: E402




@pytest.fixture(scope="session")
def ceilings(request):
    """Copy bandwidth and matmul rates, measured once per session on the benchmark device."""
    from gpt2_fast.benchmarks.kernels import pytest_params
    device, quick, _ = pytest_params(())
    c = common.measure_ceilings(device, quick=quick)
    c["stamp"] = common.stamp(device, quick)
    return c


def pytest_report_header(config):
    from gpt2_fast.benchmarks.kernels import pytest_params
    device, quick, _ = pytest_params(())
    line = f"gpt2_fast bench: {common.device_name(device)}, quick={quick}"
    return [line + (f"; {common.cpu_note(quick)}" if device.type == "cpu" else "")]

"""Test setup: Triton's interpreter on CPU-only machines, poisoned kernel outputs, devices."""
import os

import torch

# Must happen before any Triton kernel is defined (i.e. before gpt2_fast.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPT2_FAST_POISON", "1")
os.environ.pop("GPT2_FAST_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

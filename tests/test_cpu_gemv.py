"""The CPU GEMV kernels (csrc/cpu/gemv.cpp, torch.ops.gpt2_fast.cpu_linear) against float64 math on
the same weights: fp32 / bf16 / int8 (per-channel scale), both stored layouts ((N, K) and the
transposed (K, N)), ragged shapes (N, K not multiples of the 16-float vector, K = 1, N = 1), 1..8
rows of x (the GEMV) and more (the ATen GEMM path), every instruction set this CPU runs (portable,
AVX2, AVX-512), forced by the op's `isa` argument and by GPT2_FAST_CPU_ISA."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ext = pytest.importorskip("gpt2_fast.extension")
if ext.unavailable_reason("cpu") or not hasattr(torch.ops.gpt2_fast, "cpu_linear"):
    pytest.skip("the compiled extension with cpu_linear is not built", allow_module_level=True)

ISAS = {0: "portable", 1: "avx2", 2: "avx512"}


def runnable_isas():
    out = []
    for i in ISAS:
        try:
            torch.ops.gpt2_fast.cpu_isa(i)
            out.append(i)
        except RuntimeError:
            pass
    return out


def make_weight(N, K, dtype, layout, g):
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    else:
        w, scale = torch.randn(N, K, generator=g).to(dtype), None
    if layout == "kn":
        w = w.t().contiguous().t()  # (N, K) shape, (K, N) storage
    return w, scale


def reference(x, w, scale, bias):
    """float64 math on the weights as stored (bf16 / int8 values are exact in float64)."""
    y = x.double() @ w.double().t()
    if scale is not None:
        y = y * scale.double()
    return y + bias.double() if bias is not None else y


def bound(x, w, scale):
    """fp32 accumulation error allowance: a few ulps of the sum of |terms|."""
    mag = x.abs().double() @ w.abs().double().t()
    if scale is not None:
        mag = mag * scale.double()
    return 2e-6 * mag + 1e-6


SHAPES = [(1, 1, 1), (1, 37, 50), (3, 100, 1), (8, 77, 129), (5, 1001, 17), (2, 64, 768), (4, 16, 33),
          (6, 3, 300), (12, 40, 70)]  # the last one: more than 8 rows, the GEMM path


@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_cpu_linear_vs_float64(isa, dtype, layout):
    g = torch.Generator().manual_seed(isa * 100 + {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}[dtype])
    for M, N, K in SHAPES:
        w, scale = make_weight(N, K, dtype, layout, g)
        x = torch.randn(M, K, generator=g)
        for bias in (None, torch.randn(N, generator=g)):
            y = torch.ops.gpt2_fast.cpu_linear(x, w, scale, bias, isa)
            assert y.shape == (M, N) and y.dtype == torch.float32
            err = (y.double() - reference(x, w, scale, bias)).abs()
            assert (err <= bound(x, w, scale)).all(), (M, N, K, ISAS[isa], float(err.max()))


def test_cpu_linear_strided_rows_and_isas_agree():
    g = torch.Generator().manual_seed(7)
    w, scale = make_weight(300, 200, torch.int8, "nk", g)
    x = torch.randn(4, 256, generator=g)[:, :200]  # rows with a stride past K
    ys = [torch.ops.gpt2_fast.cpu_linear(x, w, scale, None, i) for i in runnable_isas()]
    for y in ys:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ys[0].double(), reference(x, w, scale, None), rtol=1e-5, atol=1e-4)


def test_cpu_linear_rejects_bad_inputs():
    op = torch.ops.gpt2_fast.cpu_linear
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="8 columns|columns"):
        op(x, torch.randn(4, 9), None, None, -1)
    with pytest.raises(RuntimeError, match="int8 weight needs its per-channel scale"):
        op(x, torch.zeros(4, 8, dtype=torch.int8), None, None, -1)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8"):
        op(x, torch.randn(4, 8).half(), None, None, -1)
    with pytest.raises(RuntimeError, match="row-major"):
        op(x, torch.randn(4, 16)[:, ::2], None, None, -1)
    with pytest.raises(RuntimeError, match="isa must be"):
        op(x, torch.randn(4, 8), None, None, 7)


def test_env_forces_the_portable_path():
    code = ("import torch, gpt2_fast.extension as e; e.unavailable_reason('cpu'); "
            "print(torch.ops.gpt2_fast.cpu_isa(-1))")
    env = dict(os.environ, GPT2_FAST_CPU_ISA="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"


def test_int8_linear_on_cpu_uses_the_kernel_and_matches_dequantized():
    from gpt2_fast.quant import Int8Linear
    lin = torch.nn.Linear(130, 45)
    m = Int8Linear.from_linear(lin)
    for rows in (1, 3, 20):
        x = torch.randn(rows, 130)
        m.kernel = "cpp"
        y = m(x)
        m.kernel = "torch"
        torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), F.linear(x.double(), m.weight.double(), lin.bias.double()),
                                   rtol=1e-5, atol=1e-5)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


FLAGS = _cpu_flags()


@pytest.mark.parametrize("dtype,flag", [(torch.int8, "avx512_vnni"), (torch.bfloat16, "avx512_bf16")], ids=str)
def test_lowp_activations_vs_float64_of_the_rounded_x(dtype, flag):
    """lowp_act: x rounded to 8 bits per sign (per-row scale, round half to even) or bf16, then exact dot products
    (VNNI int32 / BF16 pairs with fp32 accumulation)."""
    if 2 not in runnable_isas() or flag not in FLAGS or "avx512bw" not in FLAGS:
        pytest.skip(f"needs AVX-512 with {flag}")
    g = torch.Generator().manual_seed(11)
    for M, N, K in [(1, 1, 1), (1, 37, 64), (1, 50, 200), (1, 333, 3072), (3, 100, 300), (8, 77, 129), (4, 64, 768)]:
        w, scale = make_weight(N, K, dtype, "nk", g)
        x = torch.randn(M, K, generator=g) * 3
        bias = torch.randn(N, generator=g)
        y = torch.ops.gpt2_fast.cpu_linear(x, w, scale, bias, 2, True)
        if dtype == torch.int8:
            xs = x.abs().amax(1, keepdim=True) / 255       # sign split: 255 levels each side
            xr = (torch.round(x.clamp(min=0) / xs) - torch.round((-x).clamp(min=0) / xs)) * xs
        else:
            xr = x.bfloat16().float()
        err = (y.double() - reference(xr, w, scale, bias)).abs()
        assert (err <= bound(xr, w, scale) + 1e-5).all(), (M, N, K, float(err.max()))
        # and it is an approximation of the fp32-activation result, not something else
        full = torch.ops.gpt2_fast.cpu_linear(x, w, scale, bias, 2, False)
        assert (y - full).abs().max() <= 0.05 * full.abs().max() + 1e-3


def test_lowp_is_ignored_for_fp32_and_transposed_weights():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 96, generator=g)
    for dtype, layout in [(torch.float32, "nk"), (torch.int8, "kn"), (torch.bfloat16, "kn")]:
        w, scale = make_weight(40, 96, dtype, layout, g)
        a = torch.ops.gpt2_fast.cpu_linear(x, w, scale, None, -1, True)
        b = torch.ops.gpt2_fast.cpu_linear(x, w, scale, None, -1, False)
        assert torch.equal(a, b)

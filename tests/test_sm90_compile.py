"""tests/sm90_compile.py: every Triton kernel compiled for sm_90 on this CPU (Triton's real compiler,
no interpreter), with registers / spills / shared memory read from the cubin.

The default run lists the cases and discovered kernels and compiles one deliberately spilling kernel
(so the spill check is shown to fire); one real case and the whole table (every kernel, every
H100/H200 autotune config) are slow tests, and CI runs the script itself under the pinned triton
and triton 3.6.0 (.ci/sm90_compile.sh)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sm90_compile.py")


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _skip_without_ptxas(proc):
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas for sm_90 in this triton install")


def test_list_names_every_case_and_discovers_the_kernels():
    proc = _run("--list", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for case in ("layer_norm C768", "attention T1024 D64", "decode_attention B1 split16", "int8_gemv"):
        assert f"case {case}" in out, case
    for kernel in ("_layer_norm_fwd_kernel", "_bias_gelu_bwd_kernel", "_attention_bwd_dq_kernel",
                   "_decode_attention_reduce_kernel", "_int8_linear_fwd_kernel"):
        assert f"kernel {kernel} " in out, kernel


@pytest.mark.slow  # ~10-20 s of compiling; CI's sm90 step (.ci/sm90_compile.sh) runs the whole script anyway
def test_one_case_compiles_for_sm90(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("--only", "bias_gelu N3072", "--dtypes", "bf16", "--json", str(out))
    _skip_without_ptxas(proc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {"_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"} <= {r["kernel"] for r in rows}
    for r in rows:
        assert r["status"] == "ok" and 0 < r["regs"] <= 255 and r["spill_stores"] == 0, r
    assert "_bias_gelu_fwd_kernel" in proc.stdout and "regs" in proc.stdout  # the table is printed


_SPILL = r'''
import sys
sys.path.insert(0, sys.argv[1])
import sm90_compile as S
import torch, triton, triton.language as tl

@triton.jit
def _spill_kernel(X, Y, BLOCK: tl.constexpr):
    x = tl.load(X + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    tl.store(Y + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], tl.dot(x, x))

case = S.Case("spill", "gpt2_fast.poison", lambda m, dt: _spill_kernel[(1,)](
    torch.empty(64, 64, dtype=torch.float32), torch.empty(64, 64, dtype=torch.float32), BLOCK=64,
    num_warps=1, maxnreg=32), ("fp32",))
S.import_tree()
rows = S.compile_case(case, "fp32", S.sm90().cuobjdump_path(), set())
print(rows[0].status, rows[0].regs, rows[0].spill_stores)
'''


def test_a_spilling_kernel_is_reported(tmp_path):
    script = tmp_path / "spill.py"  # @triton.jit needs its source in a file
    script.write_text(_SPILL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), HERE], env=env, capture_output=True, text=True,
                          timeout=600)
    _skip_without_ptxas(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, regs, stores = proc.stdout.split()[-3:]
    assert status == "SPILL" and int(stores) > 0 and int(regs) <= 32, proc.stdout


@pytest.mark.slow  # minutes: every kernel and autotune config (CI runs the script directly)
def test_every_kernel_compiles_for_sm90_without_spills():
    proc = _run("--jobs", "2", timeout=3000)
    _skip_without_ptxas(proc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

"""Compile every Triton kernel of gpt2_fast for sm_90 (H100/H200) on this CPU and report, per
kernel and config, registers, spills and shared memory (proxies for speed: no GPU runs here).

    python tests/sm90_compile.py [--json out.json] [--jobs 2] [--only attention] [--dtypes bf16]
                                 [--quick | --all] [--list] [--strict]

How: each CASES row calls a real host launcher (kernels/<op>.py, gpt2_fast/quant.py) at GPT-2
shapes with CPU tensors. Every kernel launch is intercepted (JITFunction.run / Autotuner.run)
and, instead of running, the kernel is compiled by Triton's own compiler (front end, LLVM,
ptxas) for GPUTarget("cuda", 90, 32), which a stand-in driver reports; an autotuned kernel is
compiled once per config its own pruning keeps (what the autotuner would benchmark on an H100).
So the specialisation, the constexprs and the configs are exactly those a GPU run would get.
Resources come from the cubin: registers and stack frame (cuobjdump -res-usage), spill
instructions (STL/LDL in the SASS; Triton kernels keep nothing else in local memory) and the
dynamic shared memory Triton computed. The target, the 227 KB limit, the cubin reader and the
compile environment are kernels/_sm90.py's, shared with kernels/flash_attention_sm90.py (which
compiles every attention config, the pruned ones too, from hand-built signatures).

Exit status 1 when a kernel fails to compile, spills, needs more than 227 KB of shared memory
(an H100/H200 block's limit; a config that cannot fit must be pruned by the kernel's own code),
or a case launches nothing; a case's `allow` names a known problem (and its issue) that is then
reported as known instead. A @triton.jit `*_kernel` in kernels/ or gpt2_fast/ that no case
launches is listed as UNCOVERED (an error with --strict). Adding a kernel = one CASES row that
calls its launcher; every kernel that launcher launches is found by the interception.
Left out of the default (CI) set, --all adds them: fp32 attention with TF32 allowed and attention
with dropout on every config (exact fp32, the default fp32 path, is in; so is bf16/fp16 on every
H100/H200 autotune config).

Runs without TRITON_INTERPRET (popped before triton is imported) against whatever triton the
interpreter has: CI runs it with the pinned triton and with 3.6.0 (.ci/sm90_compile.sh).
Compiled kernels are cached by Triton in TRITON_CACHE_DIR (default: a per-version folder under
~/.cache/gpt2_fast), so a rerun with unchanged kernels takes seconds.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: the real compiler
os.environ.pop("GPT2_FAST_POISON", None)   # no NaN-filling of the (unused) outputs

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# imports of this tree's kernels, without running gpt2_fast/__init__ (it pulls the whole package
# and its dependencies; the triton-3.6 CI venv has only torch, triton and numpy)
# ---------------------------------------------------------------------------------------------

def _stub_package(name: str, path: str) -> None:
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = types.ModuleType(name)
    mod.__path__, mod.__spec__, mod.__file__ = [path], spec, spec.origin
    sys.modules[name] = mod


def import_tree() -> None:
    """gpt2_fast -> ROOT/gpt2_fast (a bare package: submodules import, __init__ does not run),
    gpt2_fast.kernels -> ROOT/kernels (as setup.py's package_dir maps it); then the compile
    environment of kernels/_sm90.py (FP fusion, the per-version kernel cache)."""
    _stub_package("gpt2_fast", os.path.join(ROOT, "gpt2_fast"))
    _stub_package("gpt2_fast.kernels", os.path.join(ROOT, "kernels"))
    sm90().compile_defaults()


def sm90():
    """kernels/_sm90.py: the sm_90 target, its shared-memory limit, the cubin reader; the same
    that kernels/flash_attention_sm90.py uses (import_tree() first)."""
    from gpt2_fast.kernels import _sm90
    return _sm90


def module(name: str):
    """A kernels/ file by its stem ("layer_norm") or a package module ("gpt2_fast.quant")."""
    import importlib
    return importlib.import_module(name if "." in name else f"gpt2_fast.kernels.{name}")


# ---------------------------------------------------------------------------------------------
# the stand-in driver and the launch interception
# ---------------------------------------------------------------------------------------------

class _Sm90Driver:
    """What JITFunction.run asks the active driver for while compiling (warmup=True)."""

    def __init__(self):
        self.target = sm90().gpu_target()

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@dataclass
class Launch:
    kernel: object           # JITFunction or Autotuner, as launched
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def intercept_launches():
    """Within: kernel[grid](...) records a Launch instead of running; warmup still compiles."""
    from triton.runtime import autotuner, driver, jit
    launches: list[Launch] = []
    saved = {cls: cls.run for cls in (jit.JITFunction, autotuner.Autotuner)}

    def make(cls):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return saved[cls](self, *args, grid=grid, warmup=True, **kwargs)
            launches.append(Launch(self, args, kwargs))
            return None
        return run

    for cls in saved:
        cls.run = make(cls)
    previous = driver._active  # None on a machine without a GPU: reset_active() would raise
    driver.set_active(_Sm90Driver())
    try:
        yield launches
    finally:
        for cls, run in saved.items():
            cls.run = run
        driver._active = previous


@contextlib.contextmanager
def pretend_cuda():
    """torch.cuda.is_available() -> True, for code that defines its kernel only where it can run
    (gpt2_fast/quant.py). Tensors stay on the CPU; the launch is intercepted anyway."""
    import torch
    saved = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = saved


# ---------------------------------------------------------------------------------------------
# the cases: GPT-2 shapes (widths 768 .. 1600, head dim 64, T = 1024, vocabulary 50257 / 50304)
# ---------------------------------------------------------------------------------------------
# Row counts are small multiples of 16 (B*T = 16384 in training specialises the same way: Triton
# specialises integers on divisibility by 16 and on == 1). Values are never read: the launches are
# intercepted, so tensors are allocated with torch.empty.

ROWS = 256
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _t(*shape, dt="bf16", grad=False):
    import torch
    dtype = getattr(torch, DTYPES.get(dt, dt))
    t = torch.empty(*shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)
    return t.requires_grad_(grad)


def _backward(*outs):
    import torch
    torch.autograd.backward([o for o in outs if o.requires_grad],
                            [torch.empty_like(o) for o in outs if o.requires_grad])


def _layer_norm(m, dt, C):
    x = _t(ROWS, C, dt=dt, grad=True)
    _backward(m.layer_norm(x, _t(C, dt=dt, grad=True), _t(C, dt=dt, grad=True)))


def _add_layer_norm(m, dt, C):
    x, r = _t(ROWS, C, dt=dt, grad=True), _t(ROWS, C, dt=dt, grad=True)
    _backward(*m.add_layer_norm(x, r, _t(C, dt=dt, grad=True), _t(C, dt=dt, grad=True)))


def _bias_gelu(m, dt, N):
    _backward(m.bias_gelu(_t(ROWS, N, dt=dt, grad=True), _t(N, dt=dt, grad=True)))


def _softmax_ce(m, dt, V):
    _backward(m.softmax_cross_entropy(_t(64, V, dt=dt, grad=True), _t(64, dt="int64")))


def _lm_head_ce(m, dt, C, V_padded, V):
    h, w = _t(64, C, dt=dt, grad=True), _t(V_padded, C, dt=dt, grad=True)
    _backward(m.lm_head_cross_entropy(h, w, _t(64, dt="int64"), vocab_size=V))


def _attention(m, dt, T=1024, H=12, D=64, dropout=0.0, fp32_prec="highest", **variant):
    """Forward + backward launchers (the public function refuses CPU tensors without the
    interpreter); q, k, v as the model makes them: views of the (B, T, 3C) c_attn output.
    variant: kernel= / variant= of the launchers (the A/B sides of choices.py), where they exist."""
    import torch
    qkv = _t(1, T, 3 * H * D, dt=dt)
    q, k, v = (t.view(1, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    seed = torch.zeros((), dtype=torch.int64) if dropout else None
    fwd_kw = {k_: v_ for k_, v_ in variant.items() if k_ == "kernel"}
    bwd_kw = {k_: v_ for k_, v_ in variant.items() if k_ == "variant"}
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_prec)
    try:
        o, lse = m.attention_fwd(q, k, v, True, dropout, D ** -0.5, seed, **fwd_kw)
        m.attention_bwd(torch.empty_like(o), q, k, v, o, lse, True, dropout, D ** -0.5, seed, **bwd_kw)
    finally:
        torch.set_float32_matmul_precision(saved)


def _decode_attention(m, dt, B, Tq, splits, S=1024, H=12, D=64):
    """Flash-decoding over a (B, H, S, D) cache: `splits` as an H100 (132 SMs) would pick them."""
    import torch
    q = _t(B, Tq, H, D, dt=dt).transpose(1, 2)
    cache = _t(B, H, S, D, dt=dt)
    m.decode_attention_fwd(q, cache, cache, torch.full((B,), S // 2, dtype=torch.int32), None,
                           D ** -0.5, num_splits=splits)


def _int8_gemv(m, dt, N, K):
    m._triton_kernel.cache_clear()
    with pretend_cuda():
        m.int8_linear_fwd(_t(1, K, dt=dt), _t(N, K, dt="int8"), _t(N, dt=dt), _t(N, dt=dt))
    m._triton_kernel.cache_clear()


def _has_param(fn, name: str) -> Optional[str]:
    import inspect
    return None if name in inspect.signature(fn).parameters else f"{fn.__name__} has no {name}= in this tree"


def _decode_step(m, dt, M, int8=False, C=768, H=12, S=1024, V=50257):
    """The fused decode step's launches (gpt2_fast/decode_fused.py) for batch bucket M: embed, per
    block qkv GEMV (LN_1 prologue, cache write), one-launch attention, three GEMVs (residual / LN_2 +
    GELU / residual), and the LM head GEMV with ln_f; int8: the same GEMVs on int8 weights + scales."""
    import torch
    import triton
    D = C // H
    x, h, y, q, logits = (_t(M, n, dt=dt) for n in (C, 4 * C, C, C, V))
    ln = (_t(C, dt=dt), _t(C, dt=dt), 1e-5)
    kc, vc = _t(M, H, S, D, dt=dt), _t(M, H, S, D, dt=dt)
    pos, kv_start = torch.zeros(1, dtype=torch.long), torch.zeros(M, dtype=torch.int32)
    w = lambda n, k: (_t(n, k, dt="int8"), _t(n, dt="fp32")) if int8 else (_t(n, k, dt=dt), None)  # noqa: E731
    m.embed(torch.zeros(M, S + 1, dtype=torch.long), pos, kv_start, _t(V, C, dt=dt), _t(S, C, dt=dt), x)
    W, sc = w(3 * C, C)
    m.qkv_gemv(x, W, ln, q, kc, vc, pos, sc, _t(3 * C, dt=dt))
    splits = max(1, min(triton.cdiv(2 * 132, M * H), triton.cdiv(S, m.ATTN_BLOCK_N), m.MAX_SPLITS))  # H100: 132 SMs
    m.attn_decode(q, kc, vc, pos, kv_start, y, m.attn_workspace(M, H, D, splits, torch.device("cpu")), splits,
                  D ** -0.5)
    for xin, (n, k), out, kw in ((y, (C, C), x, dict(residual=True)), (x, (4 * C, C), h, dict(ln=ln, gelu=True)),
                                 (h, (C, 4 * C), x, dict(residual=True)), (x, (V, C), logits, dict(ln=ln))):
        W, sc = w(n, k)
        m.gemv(xin, W, out, sc, _t(n, dt=dt) if n != V else None, **kw)


def _sampler(m, dt, B, greedy, V=50257, S=1024):
    """The on-device sampler inside a decode step (writes seq/pos/done): greedy, or top-k 50 + top-p."""
    import torch
    f32 = lambda: torch.ones(1, dtype=torch.float32)  # noqa: E731
    seq, pos = torch.zeros(B, S + 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    m.sample(_t(B, V, dt=dt), greedy, None if greedy else 50, not greedy, f32(), f32(),
             torch.zeros(1, dtype=torch.long), pos,
             step=(seq, pos, torch.zeros(B, dtype=torch.bool), torch.zeros(1, dtype=torch.bool), 50256))


@dataclass
class Case:
    name: str
    module: str                             # kernels/<module>.py, or a dotted gpt2_fast module
    run: Callable                           # run(module, dtype): launches the kernels once
    dtypes: tuple = ("bf16", "fp16", "fp32")
    tier: int = 1                           # 0: --quick, 1: the default (CI), 2: only with --all
    env: dict = field(default_factory=dict)  # environment while it runs (A/B choices)
    allow: str = ""                         # a known spill / smem excess, with its issue: reported, not failed
    needs: Optional[Callable] = None        # needs(module) -> why the case cannot run in this tree, or None


HALF = ("bf16", "fp16")
CASES = [
    Case("layer_norm C768", "layer_norm", lambda m, dt: _layer_norm(m, dt, 768), tier=0),
    Case("layer_norm C1600", "layer_norm", lambda m, dt: _layer_norm(m, dt, 1600)),
    Case("add_layer_norm C768", "layer_norm", lambda m, dt: _add_layer_norm(m, dt, 768), tier=0),
    Case("add_layer_norm C1600", "layer_norm", lambda m, dt: _add_layer_norm(m, dt, 1600)),
    Case("bias_gelu N3072", "bias_gelu", lambda m, dt: _bias_gelu(m, dt, 3072), tier=0),
    Case("bias_gelu N6400", "bias_gelu", lambda m, dt: _bias_gelu(m, dt, 6400)),
    Case("softmax_ce V50257", "cross_entropy", lambda m, dt: _softmax_ce(m, dt, 50257), tier=0),
    Case("lm_head_ce C768 V50304", "cross_entropy", lambda m, dt: _lm_head_ce(m, dt, 768, 50304, 50257), tier=0),
    Case("attention T1024 D64", "flash_attention", lambda m, dt: _attention(m, dt), HALF),
    Case("attention T1024 D64 fwd pipelined", "flash_attention",
         lambda m, dt: _attention(m, dt, kernel="pipelined"), HALF, needs=lambda m: _has_param(m.attention_fwd, "kernel")),
    Case("attention T1024 D64 bwd atomic", "flash_attention",
         lambda m, dt: _attention(m, dt, variant="triton_atomic"), HALF,
         needs=lambda m: _has_param(m.attention_bwd, "variant")),
    Case("attention T1024 D64 exact", "flash_attention", lambda m, dt: _attention(m, dt), ("fp32",)),
    Case("attention T1024 D64 tf32", "flash_attention", lambda m, dt: _attention(m, dt, fp32_prec="high"),
         ("fp32",), tier=2),
    Case("attention T1024 D64 dropout", "flash_attention", lambda m, dt: _attention(m, dt, dropout=0.1),
         ("bf16",), tier=2),
    Case("decode_attention B1 split16", "decode_attention", lambda m, dt: _decode_attention(m, dt, 1, 1, 16),
         tier=0),
    Case("decode_attention B64 single", "decode_attention", lambda m, dt: _decode_attention(m, dt, 64, 1, 1),
         HALF),
    Case("decode_attention B1 Tq5 split16", "decode_attention",
         lambda m, dt: _decode_attention(m, dt, 1, 5, 16), HALF),
    Case("decode_step M1", "decode_gemv", lambda m, dt: _decode_step(m, dt, 1), HALF, tier=0),
    Case("decode_step M64", "decode_gemv", lambda m, dt: _decode_step(m, dt, 64), HALF),
    Case("decode_step M1 int8", "decode_gemv", lambda m, dt: _decode_step(m, dt, 1, int8=True), HALF),
    Case("sampler B1 greedy", "sampler", lambda m, dt: _sampler(m, dt, 1, True), HALF, tier=0),
    Case("sampler B1 top-k top-p", "sampler", lambda m, dt: _sampler(m, dt, 1, False), HALF),
    Case("int8_gemv c_attn 2304x768", "gpt2_fast.quant", lambda m, dt: _int8_gemv(m, dt, 2304, 768), HALF,
         tier=0),
    Case("int8_gemv lm_head 50257x768", "gpt2_fast.quant", lambda m, dt: _int8_gemv(m, dt, 50257, 768), HALF),
]


# ---------------------------------------------------------------------------------------------
# compiling the recorded launches and reading the cubins
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    case: str
    dtype: str
    kernel: str
    config: str
    regs: int = -1
    spill_stores: int = -1   # STL instructions in the SASS
    spill_loads: int = -1    # LDL instructions
    stack: int = -1          # bytes of stack frame (local memory) per thread
    smem: int = -1           # bytes of dynamic shared memory per block
    seconds: float = 0.0
    status: str = "ok"
    allowed: str = ""        # the case's `allow`: a known problem, reported but not failed

    @property
    def failed(self) -> bool:
        return self.status != "ok" and not (self.allowed and not self.status.startswith("ERROR"))


def _config_label(kwargs: dict, md) -> str:
    blocks = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in sorted(kwargs.items())
                      if k.startswith("BLOCK_") and k != "BLOCK_D")
    flags = " ".join(k.replace("HAS_", "") for k, v in sorted(kwargs.items())
                     if v is True and k not in ("IS_CAUSAL", "EVEN_D", "HAS_WEIGHT"))
    return f"{blocks} w{md.num_warps} s{md.num_stages} {flags}".strip()


def _variants(launch: Launch):
    """(kernel JITFunction, kwargs) per config that would run: an autotuner's configs after its own
    early_config_prune / perf_model pruning, else the launch as it is."""
    from triton.runtime.autotuner import Autotuner
    k = launch.kernel
    if not isinstance(k, Autotuner):
        return [(k, dict(launch.kwargs))]
    k.nargs = dict(zip(k.arg_names, launch.args))
    try:
        configs = k.prune_configs(dict(launch.kwargs))
    finally:
        k.nargs = None
    return [(k.fn, {**launch.kwargs, **c.all_kwargs()}) for c in configs]


def _kernel_name(k) -> str:
    while not hasattr(k, "__code__"):  # Autotuner / Heuristics / JITFunction -> the Python function
        k = k.fn
    return k.__name__


def compile_case(case: Case, dt: str, tool: str, seen: set) -> list[Row]:
    """Run the case's launcher with launches intercepted, then compile every recorded variant."""
    saved_env = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    try:
        mod = module(case.module)
        why = case.needs(mod) if case.needs else None
        if why:
            return [Row(case.name, dt, "-", "-", status=f"SKIPPED: {why}", allowed="skipped")]
        with intercept_launches() as launches:
            case.run(mod, dt)
            rows = []
            if not launches:
                return [Row(case.name, dt, "-", "-", status="ERROR: the case launched no kernel")]
            for launch in launches:
                for fn, kwargs in _variants(launch):
                    rows.append(_compile_one(case, dt, fn, launch.args, kwargs, tool, seen))
            return [r for r in rows if r is not None]
    finally:
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _compile_one(case, dt, fn, args, kwargs, tool, seen) -> Optional[Row]:
    name = _kernel_name(fn)
    t0 = time.perf_counter()
    try:
        compiled = fn.warmup(*args, grid=(1,), **kwargs)
    except Exception as e:  # noqa: BLE001  (reported per row; the run fails at the end)
        label = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK_") or k.startswith("num_"))
        msg = str(e).strip().splitlines()
        return Row(case.name, dt, name, label, seconds=time.perf_counter() - t0,
                   status=f"ERROR: {type(e).__name__}: {msg[-1] if msg else ''}"[:300])
    secs = time.perf_counter() - t0
    if compiled.hash in seen:  # the same binary from another case or config: one row
        return None
    seen.add(compiled.hash)
    md = compiled.metadata
    row = Row(case.name, dt, name, _config_label(kwargs, md), smem=int(md.shared), seconds=secs,
              **sm90().read_cubin(compiled.asm["cubin"], tool))
    problems = []
    if row.spill_stores or row.spill_loads or row.stack > 0:
        problems.append("SPILL")
    limit = sm90().SMEM_LIMIT
    if row.smem > limit:
        problems.append(f"SMEM>{limit // 1024}KB")
    row.status = " ".join(problems) or "ok"
    row.allowed = case.allow if problems else ""
    return row


# ---------------------------------------------------------------------------------------------
# discovery, report, main
# ---------------------------------------------------------------------------------------------

_JIT_DEF = re.compile(r"@triton\.jit[^\n]*\n(?:\s*@[^\n]*\n)*\s*def (\w+_kernel)\(")


def discover_kernels() -> dict[str, str]:
    """{kernel name: file} of every @triton.jit function named *_kernel in kernels/ and gpt2_fast/
    (the naming convention of STYLE.md; helpers called from kernels have other names)."""
    found = {}
    for folder in ("kernels", "gpt2_fast"):
        for fname in sorted(os.listdir(os.path.join(ROOT, folder))):
            if fname.endswith(".py"):
                with open(os.path.join(ROOT, folder, fname)) as f:
                    for name in _JIT_DEF.findall(f.read()):
                        found[name] = f"{folder}/{fname}"
    return found


def select_cases(only: Optional[str], tier: int, shard: tuple[int, int],
                 dtypes: Optional[str] = None) -> list[tuple[Case, str]]:
    keep = dtypes.split(",") if dtypes else None
    todo = [(c, dt) for c in CASES if c.tier <= tier and (not only or only in c.name)
            for dt in c.dtypes if keep is None or dt in keep]
    return todo[shard[0]::shard[1]]


def run_cases(todo, verbose=True, progress: Optional[str] = None) -> list[Row]:
    """Compile every (case, dtype); with `progress`, the rows so far are rewritten there (JSON) after
    each case, so a run cut short by a timeout still leaves its table."""
    tool = sm90().cuobjdump_path()
    seen: set = set()
    rows: list[Row] = []
    for case, dt in todo:
        t0 = time.perf_counter()
        try:
            new = compile_case(case, dt, tool, seen)
        except Exception as e:  # noqa: BLE001  (a broken launcher is one failed row, not a crash)
            msg = str(e).strip().splitlines()
            new = [Row(case.name, dt, "-", "-", status=f"ERROR: {type(e).__name__}: {msg[0] if msg else ''}"[:300])]
        rows += new
        if progress:
            with open(progress + ".tmp", "w") as f:
                json.dump({"partial": True, "rows": [asdict(r) for r in rows]}, f)
            os.replace(progress + ".tmp", progress)
        if verbose:
            bad = sum(r.failed for r in new)
            print(f"sm90_compile: {case.name} [{dt}]: {len(new)} kernels, {time.perf_counter() - t0:.1f} s"
                  + (f", {bad} FAILED" if bad else ""), file=sys.stderr, flush=True)
    return rows


def run_sharded(args) -> list[Row]:
    """--jobs N: N child processes, each compiling every N-th case, their JSONs merged."""
    rows, procs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.jobs):
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--shard", f"{i}/{args.jobs}", "--json", out,
                   "--no-table", "--tier", str(args.tier)] + (["--only", args.only] if args.only else []) \
                + (["--dtypes", args.dtypes] if args.dtypes else [])
            procs.append((subprocess.Popen(cmd), out))
        for p, out in procs:
            p.wait()
            if not os.path.exists(out):
                rows.append(Row("-", "-", "-", "-", status=f"ERROR: shard process exited {p.returncode}"))
                continue
            with open(out) as f:
                rows += [Row(**r) for r in json.load(f)["rows"]]
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "case", "dtype", "config", "regs", "spill st/ld", "stack", "smem KB", "s", "status")
    lines = [(r.kernel, r.case, r.dtype, r.config, str(r.regs), f"{r.spill_stores}/{r.spill_loads}",
              str(r.stack), f"{r.smem / 1024:.1f}" if r.smem >= 0 else "-", f"{r.seconds:.1f}",
              r.status + (" (known)" if r.allowed and not r.status.startswith("SKIPPED") else ""))
             for r in sorted(rows, key=lambda r: (r.kernel, r.case, r.dtype))]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _git_sha() -> str:
    try:
        return os.environ.get("GPT2_FAST_GIT_SHA") or subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows, versions and uncovered kernels here")
    ap.add_argument("--only", help="only cases whose name contains this")
    ap.add_argument("--quick", dest="tier", action="store_const", const=0, default=1,
                    help="only the quick cases (one width each)")
    ap.add_argument("--all", dest="tier", action="store_const", const=2,
                    help="also fp32 attention with TF32 and attention with dropout on every config")
    ap.add_argument("--tier", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtypes", help="comma list of bf16, fp16, fp32: only these")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--strict", action="store_true", help="a kernel no case launches is an error")
    ap.add_argument("--list", action="store_true", help="list the cases and discovered kernels, compile nothing")
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import triton
    import_tree()
    kernels = discover_kernels()
    shard = tuple(int(x) for x in args.shard.split("/"))
    todo = select_cases(args.only, args.tier, shard, args.dtypes)
    if args.list:
        print("\n".join(f"case {c.name} [{dt}] -> {c.module}" for c, dt in todo))
        print("\n".join(f"kernel {k} ({f})" for k, f in kernels.items()))
        return 0
    t0 = time.perf_counter()
    rows = run_sharded(args) if args.jobs > 1 else run_cases(todo, progress=args.json)
    wall = time.perf_counter() - t0
    partial = args.only or args.tier == 0 or args.dtypes
    uncovered = [] if partial else sorted(set(kernels) - {r.kernel for r in rows})
    failed = [r for r in rows if r.failed]
    known = [r for r in rows if r.status != "ok" and not r.failed]
    if args.json:
        import torch
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                       "git_sha": _git_sha(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "smem_limit": sm90().SMEM_LIMIT, "wall_s": round(wall, 1), "rows": [asdict(r) for r in rows],
                       "uncovered": {k: kernels[k] for k in uncovered}}, f, indent=1)
    if args.no_table:
        return 1 if failed else 0
    print(f"sm90_compile: triton {triton.__version__}, target sm_90 (GPUTarget{sm90().TARGET}), "
          f"{len(rows)} compiled kernels/configs in {wall:.0f} s")
    print(format_table(rows))
    for k in uncovered:
        print(f"sm90_compile: UNCOVERED: {k} ({kernels[k]}) is launched by no case: add a CASES row")
    for r in known:
        print(f"sm90_compile: KNOWN: {r.kernel} [{r.case} {r.dtype} {r.config}]: {r.status} ({r.allowed})")
    for r in failed:
        print(f"sm90_compile: FAILED: {r.kernel} [{r.case} {r.dtype} {r.config}]: {r.status}")
    bad = bool(failed) or (args.strict and bool(uncovered))
    print(f"sm90_compile: {'FAILED' if bad else 'OK'}: {len(rows) - len(failed) - len(known)} ok, "
          f"{len(known)} known problems, {len(failed)} failed, {len(uncovered)} uncovered")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the fused decode step's kernels (kernels/decode_gemv.py, kernels/sampler.py) for sm_90
on this CPU and print registers / spills / shared memory per kernel (proxies: no GPU runs here).

    python tests/sm90_decode_step.py [name filter]

The cases call the real host launchers at gpt2 (768) and gpt2-xl (1600) shapes, batch rows 1 and
64 (the engine's smallest and largest bucket), bf16 / fp32 and int8 weights, through the launch
interception of tests/sm90_compile.py; CASES here can be appended to its table.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_compile as H  # noqa: E402  (pops TRITON_INTERPRET before triton is imported)
from sm90_compile import Case, _t  # noqa: E402

V = 50257


def _gemvs(m, dt, C, int8, M):
    w = lambda n, k: _t(n, k, dt="int8" if int8 else dt)  # noqa: E731
    s = lambda n: _t(n, dt="fp32") if int8 else None      # noqa: E731
    ln = (_t(C, dt=dt), _t(C, dt=dt), 1e-5)
    x, h = _t(M, C, dt=dt), _t(M, 4 * C, dt=dt)
    cache = _t(64, C // 64, 1024, 64, dt=dt)
    m.qkv_gemv(x, w(3 * C, C), ln, _t(M, C, dt=dt), cache, cache, _t(1, dt="int64"), s(3 * C), _t(3 * C, dt=dt))
    m.gemv(_t(M, C, dt=dt), w(C, C), x, s(C), _t(C, dt=dt), residual=True)           # attn c_proj
    m.gemv(x, w(4 * C, C), h, s(4 * C), _t(4 * C, dt=dt), ln=ln, gelu=True)       # c_fc
    m.gemv(h, w(C, 4 * C), x, s(C), _t(C, dt=dt), residual=True)                  # mlp c_proj
    m.gemv(x, w(V, C), _t(M, V, dt=dt), s(V), None, ln=ln)                        # LM head, ln_f


def _embed_attention(m, dt, C, M):
    H_ = C // 64
    cache = _t(64, H_, 1024, 64, dt=dt)
    pos, kv_start, x = _t(1, dt="int64"), _t(M, dt="int32"), _t(M, C, dt=dt)
    m.embed(_t(M, 1025, dt="int64"), pos, kv_start, _t(V, C, dt=dt), _t(1024, C, dt=dt), x)
    splits = max(1, min(-(-2 * 132 // (M * H_)), 1024 // 64, 64))   # attn_splits on a 132-SM H100/H200
    ws = (_t(M * H_ * splits, 64, dt="fp32"), _t(M * H_ * splits, dt="fp32"), _t(M * H_, dt="int32"))
    m.attn_decode(x, cache, cache, pos, kv_start, _t(M, C, dt=dt), ws, splits, 0.125)


def _sampler(m, dt):
    logits, one, i = _t(1, V, dt=dt), _t(1, dt="fp32"), _t(1, dt="int64")
    step = (_t(1, 1025, dt="int64"), i, _t(1, dt="bool"), _t(1, dt="bool"), 50256)
    m.sample(logits, True, None, False, one, one, i, i, step=step)     # greedy
    m.sample(logits, False, 50, True, one, one, i, i, step=step)       # temperature + top-k + top-p


CASES = []
for _C, _name in ((768, "gpt2"), (1600, "gpt2-xl")):
    for _M in (1, 64):
        CASES += [
            Case(f"decode_gemv {_name} M{_M}", "decode_gemv",
                 lambda m, dt, C=_C, M=_M: _gemvs(m, dt, C, False, M), ("bf16", "fp32") if _M == 1 else ("bf16",)),
            Case(f"decode_gemv int8 {_name} M{_M}", "decode_gemv",
                 lambda m, dt, C=_C, M=_M: _gemvs(m, dt, C, True, M), ("bf16",)),
            Case(f"decode embed+attention {_name} M{_M}", "decode_gemv",
                 lambda m, dt, C=_C, M=_M: _embed_attention(m, dt, C, M), ("bf16",)),
        ]
CASES.append(Case("sampler V50257", "sampler", _sampler, ("bf16", "fp32")))


def main() -> int:
    H.import_tree()
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    rows = H.run_cases([(c, dt) for c in CASES if only in c.name for dt in c.dtypes], verbose=False)
    for r in rows:
        print(f"{r.case:34s} {r.dtype:5s} {r.kernel:20s} {r.config:22s} regs {r.regs:4d} "
              f"spill {r.spill_stores}/{r.spill_loads} smem {r.smem:6d} {r.status}", flush=True)
    return int(any(r.status != "ok" for r in rows))


if __name__ == "__main__":
    raise SystemExit(main())

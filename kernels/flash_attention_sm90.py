"""Compile every flash-attention kernel and autotune config for sm_90 (H100/H200) on a CPU machine.

Triton's real front end, LLVM and ptxas run without a GPU: `compile_sm90(fn, ...)` builds one
kernel for GPUTarget("cuda", 90, 32) and returns its registers, stack and spill instructions read
from the cubin and Triton's shared-memory size (kernels/_sm90.py: the target, the limit, the cubin
reader and the per-version kernel cache, shared with tests/sm90_compile.py). The arguments are
specialised as a launch at GPT-2 shapes would be (B16 H12 T1024 C768, q/k/v as strided views of
the (B, T, 3C) c_attn output): head-dim strides of 1 become constants, pointers and other strides
carry Triton's divisible-by-16 hint.

    python -m gpt2_fast.kernels.flash_attention_sm90 [--dtype bf16] [--head-dims 64,128,256]

prints one row per (kernel, config, head dim): registers, spill stores/loads (instructions), shared
memory (bytes) beside flash_attention_smem's estimate, and whether it fits the 227 KB an sm_90
block can have; "(fixed)" marks the config launched with GPT2_FAST_TRITON_AUTOTUNE=0. Exit 1 if
a config the pruner keeps does not fit (or spills or uses stack at D = 64, GPT-2's head dim), or
if an estimate is below what Triton allocates.
Run it without TRITON_INTERPRET (the import of the kernels decides interpreter configs).
"""
from __future__ import annotations

import argparse
import sys
import time

from ._sm90 import SMEM_LIMIT, compile_defaults, cuobjdump_path, gpu_target, read_cubin
from .flash_attention_smem import smem_estimate
_FP32_PTRS = {"LSE", "Delta", "DQacc"}
_INTS = {"H", "Tq", "Tk", "D", "T_BUCKET_Q", "T_BUCKET_K"}
_INTS_DIV16 = {"Tq", "Tk", "D"}  # 1024, 1024, 64 at GPT-2 shapes: a launch marks them divisible by 16
_FLOATS = {"sm_scale", "dropout_p"}


def _signature(fn, dt: str, const: dict) -> tuple[dict, dict]:
    """(signature, attrs) of fn's arguments: constexprs, fp32 / int64 / dt pointers, i32 sizes."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in const:
            sig[a] = "constexpr"
        elif a in _FLOATS:
            sig[a] = "fp32"
        elif a in _INTS:
            sig[a] = "i32"
            if a in _INTS_DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a.startswith("stride_"):
            sig[a] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "*fp32" if a in _FP32_PTRS else "*i64" if a == "Seed" else "*" + dt
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_sm90(fn, dt: str, const: dict, num_warps: int, num_stages: int, maxnreg=None) -> dict:
    """Compile fn for sm_90 and return {regs, stack, spill_stores, spill_loads, smem, seconds} (the
    resources read from the cubin, as tests/sm90_compile.py reads them). Head-dim strides (names
    ending in "d", e.g. stride_qd) are specialised to 1 as a contiguous last dim is."""
    import triton
    from triton.compiler import ASTSource

    const = dict(const)
    for a in fn.arg_names:
        if a.startswith("stride_") and a.endswith("d") and a not in const:
            const[a] = 1
    sig, attrs = _signature(fn, dt, const)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    t0 = time.time()
    k = triton.compile(src, target=gpu_target(),
                       options={"num_warps": num_warps, "num_stages": num_stages,
                                **({"maxnreg": maxnreg} if maxnreg else {})})
    return {**read_cubin(k.asm["cubin"], cuobjdump_path()), "smem": int(k.metadata.shared),
            "seconds": time.time() - t0}


def attention_specs(D: int, dt: str = "bf16", causal: bool = True, dropout: bool = False):
    """[(label, fn, constexprs, num_warps, num_stages, family, kept)] for every attention kernel and every
    config it can launch with on a GPU: the autotune candidates and the fixed (AUTOTUNE=0) ones.
    kept: whether the pruner keeps the config at this head dim and dtype (shared memory; with
    dropout also DROPOUT_TILE_PER_THREAD)."""
    from . import flash_attention as fa
    from . import flash_attention_bwd_atomic as at
    from . import flash_attention_fwd_pipelined as pf
    from .flash_attention_smem import dropout_ok, fits

    BD = max(16, 1 << (D - 1).bit_length())
    base = dict(IS_CAUSAL=causal, HAS_DROPOUT=dropout, BLOCK_D=BD, EVEN_D=BD == D,
                DOT_PREC="tf32" if dt != "fp32" else "ieee")
    esize = 4 if dt == "fp32" else 2
    families = (("fwd", fa._attention_fwd_kernel, fa._FWD_CONFIGS, fa._FWD_FIXED),
                ("fwd_pipelined", pf._attn_fwd_pipelined_kernel, pf.CONFIGS, pf.FIXED),
                ("bwd_dkdv", fa._attention_bwd_dkdv_kernel, fa._DKDV_CONFIGS, fa._DKDV_FIXED),
                ("bwd_dq", fa._attention_bwd_dq_kernel, fa._DQ_CONFIGS, fa._DQ_FIXED),
                ("bwd_atomic", at._attn_bwd_atomic_kernel, at.CONFIGS, at.FIXED))
    if dt == "fp32":  # exact fp32 (DOT_PREC "ieee") launches one config per kernel; pipelined falls back to v1
        families = (("fwd", fa._attention_fwd_kernel, [], [fa._FWD_EXACT]),
                    ("bwd_dkdv", fa._attention_bwd_dkdv_kernel, [], [fa._DKDV_EXACT]),
                    ("bwd_dq", fa._attention_bwd_dq_kernel, [], [fa._DQ_EXACT]),
                    ("bwd_atomic", at._attn_bwd_atomic_kernel, [], [at.EXACT_FP32_CONFIG]))
    out = []
    for family, fn, tuned, fixed in families:
        # with autotuning off only the first fixed config that fits is ever launched
        key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        first_fit = next((key(c) for c in fixed if fits(family, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], BD,
                                                        c.num_stages, esize)), None)
        seen = set()
        for c in tuned + fixed:
            BM, BN, nw, ns = key(c)
            if (BM, BN, nw, ns) in seen:
                continue
            seen.add((BM, BN, nw, ns))
            tag = " (fixed)" if (BM, BN, nw, ns) == first_fit else ""
            keep = fits(family, BM, BN, BD, ns, esize) and (not dropout or dropout_ok(family, BM, BN, nw))
            out.append((f"{fn.__name__} M{BM} N{BN} w{nw} s{ns}{tag}", fn, dict(base, BLOCK_M=BM, BLOCK_N=BN), nw,
                        ns, family, keep))
    bm = at.small_block_m(esize)
    small = dict(BLOCK_D=BD, EVEN_D=BD == D)
    for fn, const in ((fa._attention_bwd_preprocess_kernel, dict(small, BLOCK_M=64)),
                      (at._attn_bwd_atomic_preprocess_kernel, dict(small, BLOCK_M=bm)),
                      (at._attn_bwd_dq_convert_kernel, dict(BLOCK_M=bm, BLOCK_D=BD, DOT_PREC=base["DOT_PREC"]))):
        out.append((f"{fn.__name__} M{const['BLOCK_M']} w4", fn, const, 4, 3, None, True))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--head-dims", default="64", help="comma-separated head dims (default 64)")
    p.add_argument("--only", default="", help="substring of the kernel label to compile")
    p.add_argument("--dropout", action="store_true")
    p.add_argument("--skip-pruned", action="store_true", help="do not compile configs the pruner drops")
    p.add_argument("--fixed-only", action="store_true", help="only the config launched with autotuning off")
    args = p.parse_args(argv)
    bad = 0
    compile_defaults()
    print(f"{'kernel / config':58s} {'D':>4s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>7s} {'estimate':>8s}  "
          f"fits  pruner  s")
    for D in (int(x) for x in args.head_dims.split(",")):
        BD = max(16, 1 << (D - 1).bit_length())
        for label, fn, const, nw, ns, family, keep in attention_specs(D, args.dtype, dropout=args.dropout):
            if args.only not in label or (args.skip_pruned and not keep) or (args.fixed_only and "(fixed)" not in label):
                continue
            try:
                r = compile_sm90(fn, args.dtype, const, nw, ns)
            except Exception as e:  # noqa: BLE001 - report every failing config, then fail
                print(f"{label:58s} {D:4d} FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                bad += keep
                continue
            fits = r["smem"] <= SMEM_LIMIT
            est = smem_estimate(family, const["BLOCK_M"], const["BLOCK_N"], BD, ns, 4 if args.dtype == "fp32" else 2) \
                if family else 0
            print(f"{label:58s} {D:4d} {r['regs']:5d} {r['spill_stores']:5d}/{r['spill_loads']:<6d} {r['smem']:7d} "
                  f"{est:8d}  {'yes' if fits else 'NO ':4s}  {'keep' if keep else 'drop':6s} {r['seconds']:.0f}",
                  flush=True)
            under = family is not None and est < r["smem"]  # the pruner's estimate must not be low
            spills = r["spill_stores"] > 0 or r["spill_loads"] > 0 or r["stack"] > 0
            bad += under or (keep and (not fits or (spills and D == 64)))  # GPT-2's head dim: no spill
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

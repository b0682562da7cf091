"""CPU: the extension's C++ ops (backend "cpp") beside the torch backend (reference, eager) and
torch's own fused CPU kernels, in the same run. Decides gpt2_fast.extension.CPU_AUTO_OPS.

    .venv/bin/python bench/cpu_cpp_ops.py [--quick] [--out bench/results/cpu-cpp-vs-torch.json]

Per op and dtype (the LM head + cross-entropy at the (B*T, C) x (50257, C) of training): median wall time of forward, and of forward + backward where the op has one,
at GPT-2 small widths. An op goes into CPU_AUTO_OPS when cpp beats the torch backend in every
forward row of that op (fp32 and bf16) and is not slower (>= 0.9x, the noise here) in any
fwd+bwd row. (cpp attention with gradients on CPU runs the reference itself: its fwd+bwd row is
the same code as torch's, measured to show that.) CPU timings on a shared machine are
noisy: the runs are interleaved (cpp, torch, cpp, torch ...) and the median is reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt2_fast import extension, reference  # noqa: E402


def _median_times(fns: dict, reps: int, warmup: int = 3) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():  # interleaved, so background load hits every contender alike
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def _fwd_bwd(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[1] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def cases(quick: bool):
    B, T, C = (2, 128, 768) if quick else (4, 256, 768)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, T, C, dtype=dtype)
        r = torch.randn(B, T, C, dtype=dtype)
        w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
        yield ("layer_norm", dtype, f"x ({B},{T},{C})", {
            "cpp": lambda: extension.layer_norm(x, w, b),
            "torch": lambda: reference.layer_norm_ref(x, w, b),
            "torch_native": lambda: F.layer_norm(x, (C,), w, b)},
            [x, w, b])
        yield ("add_layer_norm", dtype, f"x ({B},{T},{C})", {
            "cpp": lambda: extension.add_layer_norm(x, r, w, b),
            "torch": lambda: reference.add_layer_norm_ref(x, r, w, b),
            "torch_native": lambda: (lambda s: (s, F.layer_norm(s, (C,), w, b)))(x + r)},
            [x, r, w, b])
        h = torch.randn(B, T, 4 * C, dtype=dtype)
        hb = torch.randn(4 * C, dtype=dtype)
        yield ("bias_gelu", dtype, f"x ({B},{T},{4 * C})", {
            "cpp": lambda: extension.bias_gelu(h, hb),
            "torch": lambda: reference.bias_gelu_ref(h, hb),
            "torch_native": lambda: F.gelu(h + hb, approximate="tanh")},
            [h, hb])
        H, D = 12, 64
        q, k, v = (torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2) for _ in range(3))
        yield ("attention", dtype, f"q ({B},{H},{T},{D}) causal", {
            "cpp": lambda: extension.attention(q, k, v, True),
            "torch": lambda: reference.attention_ref(q, k, v, True),
            "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)},
            [q, k, v])
        N, V = B * T, 50257
        hid = torch.randn(N, C, dtype=dtype)
        emb = (0.05 * torch.randn(V, C)).to(dtype)
        tgt = torch.randint(0, V, (N,))
        yield ("lm_head_cross_entropy", dtype, f"h ({N},{C}) W ({V},{C})", {
            "cpp": lambda: extension.lm_head_cross_entropy(hid, emb, tgt),
            "torch": lambda: reference.lm_head_cross_entropy_ref(hid, emb, tgt)},
            [hid, emb])
        S = 1024
        qd = torch.randn(B, H, 1, D, dtype=dtype)
        kc, vc = torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, H, S, D, dtype=dtype)
        kv_len = torch.full((B,), 300, dtype=torch.int32)
        yield ("decode_attention", dtype, f"q ({B},{H},1,{D}), cache S={S}, kv_len=300", {
            "cpp": lambda: extension.decode_attention(qd, kc, vc, kv_len),
            "torch": lambda: reference.decode_attention_ref(qd, kc, vc, kv_len)},
            None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu-cpp-vs-torch.json"))
    args = ap.parse_args()
    why = extension.unavailable_reason("cpu")
    if why:
        sys.exit(f"the cpp backend cannot run: {why}")
    reps = 5 if args.quick else 15
    rows = []
    # warm the thread pools, allocator and page cache once, so the first row is not penalised
    warm = torch.randn(64, 768)
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        extension.layer_norm(warm, None, None)
        reference.layer_norm_ref(warm, None, None)
        warm @ warm.t()
    print(f"{'op':17s} {'dtype':9s} {'pass':8s} {'shape':34s} " + "  ".join(f"{k:>13s}" for k in
                                                                       ("cpp ms", "torch ms", "native ms")))
    for op, dtype, shape, fns, grad_inputs in cases(args.quick):
        passes = [("fwd", fns)]
        if grad_inputs is not None:
            for t in grad_inputs:
                t.requires_grad_(True)
            passes.append(("fwd+bwd", {k: _fwd_bwd(f, grad_inputs) for k, f in fns.items()}))
        for name, group in passes:
            ctx = torch.no_grad() if name == "fwd" else torch.enable_grad()
            with ctx:
                t = _median_times(group, reps)
            native = next((v for k, v in t.items() if k.startswith("torch_")), None)
            rows.append(dict(op=op, dtype=str(dtype).replace("torch.", ""), pass_=name, shape=shape,
                             cpp_ms=t["cpp"], torch_ms=t["torch"], native_ms=native,
                             native_name=next((k for k in t if k.startswith("torch_")), None),
                             speedup_vs_torch=t["torch"] / t["cpp"]))
            print(f"{op:17s} {rows[-1]['dtype']:9s} {name:8s} {shape:34s} {t['cpp']:13.3f}  {t['torch']:13.3f}  "
                  + (f"{native:13.3f}" if native is not None else f"{'-':>13s}"))
        if grad_inputs is not None:
            for t in grad_inputs:
                t.requires_grad_(False)
    slower = {r["op"] for r in rows
              if r["speedup_vs_torch"] <= (1.0 if r["pass_"] == "fwd" else 0.9)}
    faster = sorted({r["op"] for r in rows} - slower)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = "unknown"
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        torch=torch.__version__, python=platform.python_version(), git_sha=sha,
        note="median wall ms; 'torch' is the torch backend (gpt2_fast.reference, eager), 'native' "
             "torch's fused CPU op (F.layer_norm / F.gelu / SDPA) for reference; shared 2-core machine",
        rule="cpu auto op: cpp/torch speedup > 1 in every fwd row and >= 0.9 in every fwd+bwd row",
        load_average=os.getloadavg(), rows=rows, faster_than_torch_backend=faster)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"cpp faster than the torch backend (fwd > 1x, fwd+bwd >= 0.9x): {faster}\nwrote {args.out}")


if __name__ == "__main__":
    main()

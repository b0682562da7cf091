"""CPU decode latency: gpt2_fast's generate (the decode engine) vs HF transformers'
GPT2LMHeadModel.generate, same random weights, same run, batch 1, greedy.

    .venv/bin/python bench/cpu_decode_vs_hf.py [--config gpt2] [--prompt-len 32] [--new-tokens 32]
                                                [--reps 3] [--threads N] [--int8] [--out PATH]

Both models get the same weights (ours saved with save_pretrained, loaded by transformers) and
must produce the same greedy tokens. ms/token is measured the same way for both, from outside:
(time to generate N tokens - time to generate 1 token) / (N - 1), so prefill is excluded; runs
are interleaved (ours, HF, ours, HF ...) so background load hits both alike; the median and the
best (least disturbed) rep are reported. Napkin math: a decode step reads every weight once (124M params x 4 B = 0.5 GB
for gpt2 fp32, a third of it the LM head), so ms/token >= bytes / memory bandwidth; the copy
bandwidth measured in the same run gives that floor. CPU timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpt2_fast import GPT, GPTConfig, generate  # noqa: E402
from gpt2_fast.engine import get_engine  # noqa: E402


def copy_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 5) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9  # read + write


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both (default: torch's)")
    p.add_argument("--int8", action="store_true", help="also time our generate with int8 weights")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-decode-vs-hf-<config>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_name(args.config)).eval()
    get_engine(ours, cpu_layout=True)  # inference only: weights in the faster CPU GEMV layout
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, dtype=torch.float32).eval()
    prompt = torch.randint(0, 50000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    N = args.new_tokens

    def run_hf(n):
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=50256)
        return out[0, args.prompt_len:].tolist()

    def run_ours(model):
        def f(n):
            return generate(model, [prompt[0].tolist()], max_new_tokens=n, temperature=0,
                            stop_at_eot=False).tokens[0]
        return f

    contenders = {"gpt2_fast": run_ours(ours), "hf_transformers": run_hf}
    if args.int8:
        from gpt2_fast.quant import quantize_int8
        q = GPT(GPTConfig.from_name(args.config)).eval()
        q.load_state_dict(ours.state_dict())
        contenders["gpt2_fast_int8"] = run_ours(quantize_int8(q))

    tokens = {k: f(N) for k, f in contenders.items()}  # warm-up, and the outputs to compare
    same = tokens["gpt2_fast"] == tokens["hf_transformers"]
    times = {k: [] for k in contenders}
    for _ in range(args.reps):
        for k, f in contenders.items():
            t0 = time.perf_counter()
            f(1)
            t1 = time.perf_counter()
            f(N)
            t2 = time.perf_counter()
            times[k].append(((t2 - t1) - (t1 - t0)) / (N - 1) * 1e3)
    ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    bw = copy_bandwidth_gbs()
    weight_bytes = sum(t.numel() * t.element_size() for n, t in ours.named_parameters() if "wpe" not in n)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3

    from gpt2_fast.benchmarks.common import stamp, write_json
    st = stamp(torch.device("cpu"))
    print(f"{args.config} fp32, batch 1, prompt {args.prompt_len}, {N} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'contender':<18} {'median':>9} {'vs HF':>7} {'best':>9} {'vs HF':>7}   all reps (ms/token)")
    for k, v in ms.items():
        print(f"{k:<18} {v:9.2f} {ms['hf_transformers'] / v:6.2f}x {best[k]:9.2f} "
              f"{best['hf_transformers'] / best[k]:6.2f}x   " + " ".join(f"{t:.1f}" for t in times[k]))
    print(f"floor: {weight_bytes / 1e6:.0f} MB of weights / {bw:.1f} GB/s copy bandwidth = {floor_ms:.1f} ms/token")
    print(f"same greedy tokens as HF: {same}")
    print(f"[{st['device']} | torch {st['torch']} | transformers {st['transformers']} | git {st['git_sha']} | "
          f"{st['date_utc']}]")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"cpu-decode-vs-hf-{args.config}.json")
    write_json(out, dict(stamp=st, config=args.config, prompt_len=args.prompt_len, new_tokens=N,
                         threads=torch.get_num_threads(), reps=args.reps, ms_per_token=ms, best_ms_per_token=best,
                         all_ms_per_token=times, speedup_vs_hf=ms["hf_transformers"] / ms["gpt2_fast"],
                         best_speedup_vs_hf=best["hf_transformers"] / best["gpt2_fast"],
                         same_tokens_as_hf=same, copy_bandwidth_gbs=bw, weight_bytes=weight_bytes,
                         floor_ms_per_token=floor_ms))
    print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

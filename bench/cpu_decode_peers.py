"""CPU decode: gpt2_fast (fp32 / bf16 / int8) beside ONNX Runtime and CTranslate2, same run.

    .venv/bin/python bench/cpu_decode_peers.py [--config gpt2] [--prompt-len 32] [--new-tokens 128]
        [--reps 5] [--threads 1,2] [--engines ours_fp32,ours_bf16,ours_int8,ort_fp32,ort_int8,ct2_fp32,ct2_int8]
        [--out NEW.json]   (default: bench/results/cpu-decode-peers-<UTC date-time>-cpu.json, never overwritten)

One set of random gpt2 weights (seed 0) is saved with save_pretrained; every engine loads it from
that folder: ours with GPT.from_pretrained; ONNX Runtime from a decoder with past key values that
this script exports with torch.onnx from those weights (plain GPT-2 math, past as two (L, B, H, P, D)
inputs; int8 = onnxruntime.quantization.quantize_dynamic, i.e. W8A8); CTranslate2 through its
transformers converter (float32 and int8). Each engine runs in its own worker process (so its
resident set is its own), one per thread count; a repetition runs every (engine, thread count)
once, in a rotated order (interleaved, so background load hits all alike, and the 2-thread scaling
is a per-rep ratio too). Batch 1, greedy, a fixed
random prompt; per run: time to first token (prefill + first token; the median of 3 prefills in
the rep, TTFT_SAMPLES), ms/token over the rest,
the tokens (agreement = positions equal to ours fp32's). RSS: VmRSS of the worker after its
runs, and the same minus the worker's RSS after imports (what the model and its runtime add);
(anon): the growth of RssAnon alone (no lazily touched library code pages: the model's memory).
Floor: the bytes a decode step must read (every weight but the embeddings; the tied LM head
counts once) / the copy bandwidth measured in this run (read + write bytes / time), reported
next to the results with the machine and its load (`uptime`) before and after.
CPU timings on a shared machine are noisy: compare ratios within a run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS_PY = os.path.join(ROOT, "gpt2_fast", "benchmarks", "cpu_peers.py")  # the peers' exports and runners
# TTFT is one ~50-120 ms event, the noisiest figure on a shared host: each rep takes the median of
# this many prefills (the long generation's own, then TTFT_SAMPLES - 1 one-token generations)
TTFT_SAMPLES = 3
ENGINES = ("ours_fp32", "ours_bf16", "ours_int8", "ours_w8a8", "ours_bf16a", "ort_fp32", "ort_int8", "ct2_fp32",
           "ct2_int8")


# ---------------------------------------------------------------------------------------------
# workers: one engine each, driven over stdin/stdout (one JSON line per request)
# ---------------------------------------------------------------------------------------------

def rss_mb(field: str = "VmRSS") -> float:
    """VmRSS (all resident pages), or RssAnon (anonymous ones only: the model's memory, without the
    shared-library code pages a run touches lazily) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_ours(model_dir: str, kind: str, threads: int):
    """kind: fp32, bf16, int8 (weight-only: fp32 activations), w8a8 / bf16a (int8 / bf16 activations
    too: GPT2_FAST_CPU_LOWP_ACT=1; what an int8 / bf16 model runs by default on a VNNI / AVX512-BF16 CPU)."""
    import torch
    os.environ["GPT2_FAST_CPU_LOWP_ACT"] = "1" if kind in ("w8a8", "bf16a") else "0"
    from gpt2_fast import GPT
    from gpt2_fast.engine import Engine
    torch.set_num_threads(threads)
    model = GPT.from_pretrained(model_dir).eval()
    if kind.startswith("bf16"):
        model = model.to(torch.bfloat16)   # new tensors: the checkpoint's file mapping is dropped
    elif kind in ("int8", "w8a8"):
        from gpt2_fast.quant import quantize_int8
        quantize_int8(model)
    from gpt2_fast.cpu_decode import pack_for_cpu_inference
    engine = Engine(pack_for_cpu_inference(model))  # own (out, in) copies, off the file mapping

    def run(prompt, n):
        timings: dict = {}
        toks = [int(t[0]) for t in engine.generate_ids([prompt], n, temperature=0, stop_at_eot=False,
                                                       timings=timings)]
        return toks, timings["ttft_s"], timings["decode_s"]
    return run


def peers_module():
    """gpt2_fast/benchmarks/cpu_peers.py loaded by path: importing it through the package would
    import torch (gpt2_fast/__init__) into a peer's worker, beside the peer's own runtime."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpt2_fast_cpu_peers", PEERS_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_peer(run):
    """A cpu_peers runner as (tokens, ttft_s, decode_s)."""
    def timed(prompt, n):
        toks, marks = run(prompt, n)
        return toks, marks[1] - marks[0], marks[-1] - marks[1]
    return timed


def worker(args) -> int:
    base_rss = rss_mb()
    threads = args.threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    eng, kind = args.worker.split("_")
    if eng == "ours":
        base_rss = _after_import("torch", "gpt2_fast")
        run = load_ours(args.model_dir, kind, threads)
    elif eng == "ort":
        base_rss = _after_import("onnxruntime", "numpy")
        run = load_peer(peers_module().ort_runner(os.path.join(args.work, f"gpt2-{kind}.onnx"), threads,
                                                  **json.loads(args.cfg)))
    else:
        base_rss = _after_import("ctranslate2")
        run = load_peer(peers_module().ct2_runner(os.path.join(args.work, f"ct2-{kind}"), threads))
    prompt = json.loads(args.prompt)
    run(prompt, 4)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        toks, ttft, decode = run(prompt, args.new_tokens)
        ttfts = [ttft] + [run(prompt, 1)[1] for _ in range(TTFT_SAMPLES - 1)]
        ttft = statistics.median(ttfts)
        print(json.dumps({"tokens": toks, "ttft_ms": ttft * 1e3, "ms_per_token": decode / (len(toks) - 1) * 1e3,
                          "rss_mb": rss_mb(), "base_rss_mb": base_rss, "anon_mb": rss_mb("RssAnon"),
                          "base_anon_mb": base_anon}), flush=True)
    return 0


def _after_import(*mods) -> float:
    import importlib
    global base_anon
    for m in mods:
        importlib.import_module(m)
    base_anon = rss_mb("RssAnon")
    return rss_mb()


base_anon = float("nan")  # RssAnon after the imports (set by _after_import)


# ---------------------------------------------------------------------------------------------
# preparing the peers' model files from the save_pretrained folder
# ---------------------------------------------------------------------------------------------

def prepare_peers(engines, model_dir: str, work: str) -> dict:
    """Build the peers' files; returns {engine: reason} for those that cannot run here."""
    from gpt2_fast.benchmarks import cpu_peers
    skipped = {}
    if any(e.startswith("ort") for e in engines):
        try:
            cpu_peers.export_onnx(model_dir, os.path.join(work, "gpt2-fp32.onnx"))
            if "ort_int8" in engines:
                cpu_peers.quantize_onnx(os.path.join(work, "gpt2-fp32.onnx"), os.path.join(work, "gpt2-int8.onnx"))
        except Exception as e:  # not installed, or the export failed: report, keep going
            for k in ("ort_fp32", "ort_int8"):
                skipped[k] = f"{type(e).__name__}: {str(e)[:300]}"
    for kind, q in (("fp32", "float32"), ("int8", "int8")):
        if f"ct2_{kind}" not in engines:
            continue
        try:
            cpu_peers.convert_ct2(model_dir, os.path.join(work, f"ct2-{kind}"), q)
        except Exception as e:
            skipped[f"ct2_{kind}"] = f"{type(e).__name__}: {str(e)[:300]}"
    return skipped


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def start_worker(name, threads, args, work, model_dir, prompt, cfg):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(threads),
           "--model-dir", model_dir, "--work", work, "--prompt", json.dumps(prompt), "--cfg", json.dumps(cfg),
           "--new-tokens", str(args.new_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {name} failed to start")
    return p


def ask(p) -> dict:
    p.stdin.write("run\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("worker died")
    return json.loads(line)


def measure(engines, threads, args, work, model_dir, prompt, cfg) -> dict:
    """{thread count: {engine: [one result per rep]}}. Every (engine, thread count) has its own worker,
    and a rep runs them all back to back in a rotated order: the thread counts are interleaved too,
    so the 2-thread scaling compares the same stretch of machine time (one count's reps after the
    other's mixed a drift of the host into it)."""
    procs = {}
    for t in threads:
        for e in engines:
            try:
                procs[(e, t)] = start_worker(e, t, args, work, model_dir, prompt, cfg)
            except Exception as ex:
                print(f"  {e} at {t} thread(s): {ex}", file=sys.stderr)
    runs = {t: {e: [] for e in engines if (e, t) in procs} for t in threads}
    keys = list(procs)
    for r in range(args.reps):
        for e, t in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate who goes first
            time.sleep(0.5)  # the previous engine's idle threads stop spinning (OpenMP, ORT pools)
            runs[t][e].append(ask(procs[(e, t)]))
    for p in procs.values():
        p.stdin.close()
        p.wait(timeout=60)
    return runs


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def summarize(runs: dict, ref_tokens) -> dict:
    out = {}
    for e, rs in runs.items():
        toks = rs[-1]["tokens"]
        out[e] = dict(ms_per_token=median([r["ms_per_token"] for r in rs]),
                      ms_per_token_all=[round(r["ms_per_token"], 2) for r in rs],
                      ttft_ms=median([r["ttft_ms"] for r in rs]),
                      ttft_ms_all=[round(r["ttft_ms"], 2) for r in rs], rss_mb=rs[-1]["rss_mb"],
                      rss_above_imports_mb=rs[-1]["rss_mb"] - rs[-1]["base_rss_mb"],
                      anon_above_imports_mb=rs[-1]["anon_mb"] - rs[-1]["base_anon_mb"],
                      agree=sum(a == b for a, b in zip(toks, ref_tokens)) if ref_tokens else None,
                      n_tokens=len(toks), tokens=toks)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="gpt2")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--out", default=None, help="the JSON to write (a new file; default: "
                   "bench/results/cpu-decode-peers-<date>-cpu.json); the PNG goes beside it")
    p.add_argument("--keep", default=None, help="a folder for the weights and the peers' exports, reused "
                                                 "when it already has them (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engines {bad}; expected some of {','.join(ENGINES)}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.out and os.path.exists(args.out):  # results of another run: never overwritten
        p.error(f"--out {args.out} exists; expected a new file name (or no --out: a dated one)")
    return drive(args, engines, threads)


def drive(args, engines, threads) -> int:
    sys.path.insert(0, ROOT)
    import torch
    from gpt2_fast import GPT, GPTConfig
    from gpt2_fast.benchmarks.common import result_path, stamp, write_json
    load_before = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        model_dir = os.path.join(work, "hf")
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name(args.config)).eval()
        reuse = os.path.exists(os.path.join(model_dir, "config.json"))
        if not reuse:
            model.save_pretrained(model_dir)
        cfg = dict(n_layer=model.config.n_layer, n_head=model.config.n_head, n_embd=model.config.n_embd)
        wbytes = {k: floor_bytes(model, k) for k in ("fp32", "bf16", "int8")}
        del model
        prompt = torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        skipped = {} if reuse else prepare_peers(engines, model_dir, work)
        engines = [e for e in engines if e not in skipped]
        print(f"-- {', '.join(engines)} at {', '.join(map(str, threads))} thread(s); {args.reps} interleaved reps",
              file=sys.stderr)
        results = {}
        for t, runs in measure(engines, threads, args, work, model_dir, prompt, cfg).items():
            ref = runs.get("ours_fp32", [{}])[-1].get("tokens")
            results[str(t)] = summarize(runs, ref)
    pairs = paired(results)
    bw = copy_bandwidth_gbs()
    load_after = open("/proc/loadavg").read().split()[:3]
    report(results, pairs, threads, bw, wbytes, skipped, load_before, load_after, args)
    st = stamp(torch.device("cpu"))
    args.out = args.out or result_path(os.path.join(HERE, "results"), "cpu-decode-peers", st, "json")
    write_json(args.out, dict(stamp=st, machine=machine(), config=args.config,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps,
                              load_before=load_before, load_after=load_after, copy_bandwidth_gbs=bw,
                              floor_bytes=wbytes, floor_ms={k: v / bw / 1e6 for k, v in wbytes.items()},
                              skipped=skipped, results=results, paired=pairs, command=" ".join(sys.argv)))
    png = plot(results, os.path.splitext(args.out)[0] + ".png", st, describe(args, load_before, load_after))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


# the goals as pairs (a, b, goal on a's time / b's time, which time)
PAIRS = (("ours_fp32", "ort_fp32", 1.0, "ms_per_token"), ("ours_fp32", "ort_fp32", 1.0, "ttft_ms"),
         ("ours_w8a8", "ct2_int8", 1.0, "ms_per_token"), ("ours_int8", "ct2_int8", 1.0, "ms_per_token"),
         ("ours_bf16a", "ours_fp32", 0.6, "ms_per_token"), ("ours_bf16", "ours_fp32", 0.6, "ms_per_token"))


def paired(results: dict) -> dict:
    """Per goal pair and thread count: the median over reps of a's ms/token / b's in the same rep
    (a rep runs every engine back to back, so this ratio sees the same machine state on both
    sides; the ratio of medians mixes reps), and in how many reps a met the goal. Also the
    2-thread scaling of every engine (median over reps of 1-thread / 2-thread time)."""
    out = {}
    for t, res in results.items():
        for a, b, goal, field in PAIRS:
            if a in res and b in res:
                r = [x / y for x, y in zip(res[a][field + "_all"], res[b][field + "_all"])]
                name = f"{a}/{b}@{t}" + (" TTFT" if field == "ttft_ms" else "")
                out[name] = dict(median=median(r), met=sum(x <= goal for x in r), reps=len(r), goal=goal)
    if "1" in results and "2" in results:  # per rep: the two counts ran in the same rep
        for e in results["1"]:
            if e in results["2"]:
                out[f"scaling {e}"] = median([a / b for a, b in zip(results["1"][e]["ms_per_token_all"],
                                                                     results["2"][e]["ms_per_token_all"])])
    return out


def plot(results: dict, path: str, st: dict, what: str):
    """ms/token and time to first token per engine, a panel per thread count (PNG; None without
    matplotlib); st: the run's stamp, what: the run in words (the subtitle)."""
    from gpt2_fast.benchmarks.common import plot_bars
    groups = {}
    for t, res in results.items():
        groups[f"decode, {t} thread(s)"] = [(e, "ms/token", r["ms_per_token"]) for e, r in res.items()]
        groups[f"time to first token, {t} thread(s)"] = [(e, "TTFT ms", r["ttft_ms"]) for e, r in res.items()]
    return plot_bars(path, groups, dict(st, note=what), lambda title: "ms (median of reps)")


def floor_bytes(model, kind: str) -> int:
    """Bytes one decode step must read: the block weights and the LM head (not wte/wpe gathers)."""
    size = {"fp32": 4, "bf16": 2, "int8": 1}[kind]
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and ".h." in name)
    head = model.lm_head.weight.numel()
    small = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1) * 4  # LN, biases: fp32
    return (n + head) * size + small


def copy_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 5) -> float:
    import torch
    torch.set_num_threads(1)
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9  # read + write bytes


def machine() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
            if k.strip() == "Flags":
                info["simd"] = [f for f in v.split() if f.startswith(("avx512", "avx2", "amx", "avx_vnni"))]
    except OSError:
        pass
    return info


def describe(args, load_before, load_after) -> str:
    return (f"{args.config}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
            f"median of {args.reps} interleaved reps; load {load_before} -> {load_after}")


def report(results, pairs, threads, bw, wbytes, skipped, load_before, load_after, args) -> None:
    print(describe(args, load_before, load_after))
    for t in threads:
        res = results[str(t)]
        base = res.get("ours_fp32", {}).get("ms_per_token")
        print(f"\n{t} thread(s)\n{'engine':<10} {'ms/token':>9} {'vs ours fp32':>13} {'TTFT ms':>8} "
              f"{'RSS MB':>7} {'(model)':>8} {'(anon)':>7} {'agree':>8}")
        for e, r in res.items():
            ratio = f"{base / r['ms_per_token']:.2f}x" if base else "-"
            agree = f"{r['agree']}/{r['n_tokens']}" if r["agree"] is not None else "-"
            print(f"{e:<10} {r['ms_per_token']:9.2f} {ratio:>13} {r['ttft_ms']:8.1f} {r['rss_mb']:7.0f} "
                  f"{r['rss_above_imports_mb']:8.0f} {r['anon_above_imports_mb']:7.0f} {agree:>8}")
    if pairs:
        print("\npaired (median over reps of the ratio within a rep; goal met in k of n reps) and 2-thread scaling"
              " (median over reps):")
        for k, v in pairs.items():
            print(f"  {k:<33} " + (f"{v['median']:.3f}  (goal <= {v['goal']}: {v['met']}/{v['reps']})"
                                     if isinstance(v, dict) else f"{v:.2f}x"))
    print(f"\nfloor (bytes a step reads / {bw:.1f} GB/s copy bandwidth): "
          + ", ".join(f"{k} {v / 1e6:.0f} MB = {v / bw / 1e6:.1f} ms" for k, v in wbytes.items()))
    for e, why in skipped.items():
        print(f"skipped {e}: {why}")


if __name__ == "__main__":
    raise SystemExit(main())

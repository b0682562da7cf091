"""Inference latency: prefill + greedy decode at batch 1, ours beside its peers in the same run.

Peers (same weights, same prompt, same number of new tokens, greedy, no early stop):
  ours      gpt2_fast.generate.generate_ids (whatever engine it uses when this runs), timed
            per token with CUDA events recorded as each token is yielded (no extra host sync)
  hf        transformers GPT2LMHeadModel.generate, built from our weights via save_pretrained
  compile   gpt-fast's recipe on our model with the torch backend: static KV cache, the one-token
            step under torch.compile(mode="reduce-overhead", fullgraph=True) on CUDA; plain eager
            on CPU (compiling takes minutes there) unless --compile
  ort       (CPU, fp32, batch 1) ONNX Runtime on a decoder with past key values exported from our
            weights (benchmarks/cpu_peers.py), intra-op threads = torch's
  ct2       (CPU, fp32, batch 1) CTranslate2 float32 converted from our weights, as many threads
            ort and ct2 are optional (pip install -e '.[peers]'): a skipped row says why when absent
            (int8 and interleaved repetitions: bench/cpu_decode_peers.py)
Reported: time to first token (prefill + first sample), ms/token p50 / p90 / mean over the decode
steps, tokens/s, achieved GB/s = (weight bytes + live KV bytes) per token / time per token, peak
GPU memory, and warm-up (compile / graph capture) time. Weight bytes count every parameter once
(the tied wte/lm_head once) except wpe, of which a step reads one row; live KV bytes are
2 x n_layer x B x n_head x L x head_dim x e at the mean live length L = P + N/2.
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from typing import Optional

import torch

from ..config import PRESETS, GPTConfig
from . import common

TINY = "tiny"
TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=128)
PEERS = ("ours", "hf", "compile", "ort", "ct2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

def _local_hub_copy(name: str) -> Optional[str]:
    """A cached HF hub snapshot of preset `name`, looked up without touching the network."""
    try:
        from huggingface_hub import snapshot_download
        from ..hf import HUB_REPOS
        return snapshot_download(HUB_REPOS[name], local_files_only=True,
                                 allow_patterns=["config.json", "model.safetensors"])
    except Exception:
        return None


def load_model(spec: str, device: torch.device, dtype: torch.dtype):
    """(model on device in eval mode, where its weights came from)."""
    from ..model import GPT
    if spec == TINY or spec in PRESETS:
        path = _local_hub_copy(spec) if spec in PRESETS else None
        if path:
            model, source = GPT.from_pretrained(path), f"pretrained {spec} ({path})"
        else:
            torch.manual_seed(0)
            cfg = GPTConfig(**TINY_CONFIG) if spec == TINY else GPTConfig.from_name(spec)
            with torch.device(device):  # initialise on the device: seconds saved for gpt2-xl
                model = GPT(cfg)
            source = (f"random weights with {spec}'s shapes" +
                      (" (no local copy of the checkpoint, and no internet)" if spec in PRESETS else "") +
                      "; speed does not depend on the weights")
    elif os.path.isdir(spec):
        model, source = GPT.from_pretrained(spec), f"HF checkpoint {spec}"
    elif spec.endswith(".pt") and os.path.isfile(spec):
        from ..checkpoint import load_model_from_checkpoint
        model, source = load_model_from_checkpoint(spec), f"checkpoint {spec}"
    else:
        raise ValueError(f"--model must be a preset ({', '.join(PRESETS)}), '{TINY}', an HF checkpoint "
                         f"directory or a .pt checkpoint; got {spec!r}")
    return model.to(device=device, dtype=dtype).eval(), source


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def kv_bytes(cfg, batch: int, live: float, dtype: torch.dtype) -> float:
    e = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layer * batch * cfg.n_head * live * cfg.head_dim * e


# ---------------------------------------------------------------------------------------------
# per-token clocks
# ---------------------------------------------------------------------------------------------

class Clock:
    """Marks on the device's timeline: CUDA events (no sync) on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Times between consecutive marks, in ms."""
        common.sync(self.device)
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _summary(name: str, ttft_s: float, steps_ms: list[float], cfg, batch: int, prompt_len: int,
             new_tokens: int, wbytes: int, dtype: torch.dtype, device: torch.device, **extra) -> dict:
    if not steps_ms:
        raise RuntimeError(f"{name}: no decode steps were timed (need --new-tokens >= 2)")
    mean = sum(steps_ms) / len(steps_ms)
    live = prompt_len + new_tokens / 2
    per_token_bytes = wbytes + kv_bytes(cfg, batch, live, dtype)
    return dict(peer=name, status="ok", ttft_ms=ttft_s * 1e3,
                ms_per_token_p50=common.quantile(steps_ms, 0.5), ms_per_token_p90=common.quantile(steps_ms, 0.9),
                ms_per_token_mean=mean, tokens_per_s=batch * 1e3 / mean,
                achieved_gbps=per_token_bytes / (mean * 1e-3) / 1e9, bytes_per_token=per_token_bytes,
                decode_steps=len(steps_ms), peak_mem_gb=common.peak_memory_gb(device), **extra)


# ---------------------------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------------------------

def _ours_once(model, prompt: list[list[int]], new_tokens: int, device: torch.device):
    from ..generate import generate_ids
    clock = Clock(device)
    timings: dict = {}
    common.sync(device)
    t0 = time.perf_counter()
    clock.mark()
    ids = []
    for nxt in generate_ids(model, prompt, max_new_tokens=new_tokens, temperature=0.0,
                            stop_at_eot=False, timings=timings):
        clock.mark()
        ids.append(nxt)
    common.sync(device)
    wall = time.perf_counter() - t0
    iv = clock.intervals_ms()
    return iv, timings, wall, torch.stack(ids, 1).tolist() if ids else []


def run_ours(model, prompt, new_tokens, device, dtype, wbytes, P):
    from ..engine import get_engine
    get_engine(model, cpu_layout=True)  # an inference-only model: the faster CPU GEMV layout
    common.reset_peak_memory(device)
    t0 = time.perf_counter()
    _ours_once(model, prompt, new_tokens, device)   # warm-up, same call: allocations, captures, autotune
    warmup_s = time.perf_counter() - t0
    iv, timings, wall, ids = _ours_once(model, prompt, new_tokens, device)
    ttft_s = timings.get("ttft_s", iv[0] * 1e-3)
    extra = {k: v for k, v in timings.items() if isinstance(v, (int, float, str)) and
             any(w in k for w in ("compile", "capture", "graph", "engine"))}
    from .. import ops
    backends = {op: ops.resolve(op, ops.requested_backend(model.config.backend), device.type)[0]
                for op in ("layer_norm", "attention", "decode_attention", "bias_gelu")}
    return _summary("ours", ttft_s, iv[1:], model.config, len(prompt), P, new_tokens, wbytes, dtype, device,
                    warmup_s=warmup_s, wall_s=wall, detail="generate_ids; backends " +
                    ", ".join(f"{k}={v}" for k, v in backends.items()), **extra), ids


class _StreamClock:
    """A transformers streamer that timestamps each new token (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(model, prompt, new_tokens, device, dtype, wbytes, P):
    try:
        from transformers import GPT2LMHeadModel
    except Exception as e:
        return dict(peer="hf", status="skipped", reason=f"transformers is not importable ({type(e).__name__}: {e})"), None
    with tempfile.TemporaryDirectory(prefix="gpt2_fast_bench_hf_") as tmp:
        model.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp)
    hf = hf.to(device=device, dtype=dtype).eval()
    common.reset_peak_memory(device)
    idx = torch.tensor(prompt, device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(idx), pad_token_id=50256)

    def once(n):
        s = _StreamClock()
        common.sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(idx, streamer=s, **dict(kw, max_new_tokens=n, min_new_tokens=n))
        common.sync(device)
        return t0, s.times, out

    t0 = time.perf_counter()
    once(min(new_tokens, 8))
    warmup_s = time.perf_counter() - t0
    t0, times, out = once(new_tokens)
    ttft = times[0] - t0
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    ids = out[:, idx.shape[1]:].tolist()
    row = _summary("hf", ttft, steps, model.config, len(prompt), P, new_tokens, wbytes, dtype, device,
                   warmup_s=warmup_s, detail="GPT2LMHeadModel.generate, greedy, dynamic cache")
    del hf
    return row, ids


def run_cpu_peer(name: str, model, prompt, new_tokens, device, dtype, wbytes, P):
    """ONNX Runtime ("ort") or CTranslate2 ("ct2") on our weights (save_pretrained, then their
    own export / converter), fp32, batch 1, greedy; a warm-up run, then the timed one."""
    from . import cpu_peers
    if device.type != "cpu" or dtype != torch.float32 or len(prompt) != 1:
        return dict(peer=name, status="skipped", reason="a CPU peer for fp32 weights at batch 1 "
                    f"(this run: {device.type}, {str(dtype).removeprefix('torch.')}, batch {len(prompt)})"), None
    why = cpu_peers.missing("onnxruntime" if name == "ort" else "ctranslate2")
    if why:
        return dict(peer=name, status="skipped", reason=why), None
    cfg, threads = model.config, torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix=f"gpt2_fast_bench_{name}_") as tmp:
        model.save_pretrained(os.path.join(tmp, "hf"))
        t0 = time.perf_counter()
        if name == "ort":
            cpu_peers.export_onnx(os.path.join(tmp, "hf"), os.path.join(tmp, "gpt2.onnx"))
            run = cpu_peers.ort_runner(os.path.join(tmp, "gpt2.onnx"), threads, cfg.n_layer, cfg.n_head, cfg.n_embd)
            detail = f"onnxruntime {common.module_version('onnxruntime')}, exported decoder with past key values"
        else:
            cpu_peers.convert_ct2(os.path.join(tmp, "hf"), os.path.join(tmp, "ct2"), "float32")
            run = cpu_peers.ct2_runner(os.path.join(tmp, "ct2"), threads)
            detail = f"ctranslate2 {common.module_version('ctranslate2')} Generator, float32"
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(prompt[0], min(new_tokens, 8))
        warmup_s = time.perf_counter() - t0
        toks, marks = run(prompt[0], new_tokens)
    steps = [(b - a) * 1e3 for a, b in zip(marks[1:], marks[2:])]
    row = _summary(name, marks[1] - marks[0], steps, cfg, 1, P, new_tokens, wbytes, dtype, device,
                   warmup_s=warmup_s, export_s=prepare_s, detail=f"{detail}, {threads} thread(s)")
    return row, [toks]


def run_compile(model, prompt, new_tokens, device, dtype, wbytes, P, allow_compile: bool):
    """gpt-fast's static-cache decode on our model with the torch backend."""
    orig = model.config.backend
    model.set_backend("torch")
    try:
        use_compile = device.type == "cuda" or allow_compile
        B = len(prompt)

        def step(tok, pos):
            logits, _ = model(tok, input_pos=pos, only_last=True)
            return logits[:, -1].argmax(-1, keepdim=True)

        def compiled(fullgraph: bool):
            return torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else "default",
                                 fullgraph=fullgraph)
        f = compiled(True) if use_compile else step
        note = ""
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if device.type == "cuda" else None
        idx = torch.tensor(prompt, device=device)

        def once(n):
            clock = Clock(device)
            model.setup_cache(B, P + new_tokens)
            common.sync(device)
            t0 = time.perf_counter()
            clock.mark()
            with torch.inference_mode():
                logits, _ = model(idx, input_pos=torch.arange(P, device=device), only_last=True)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                clock.mark()
                ids = [tok]
                for i in range(n - 1):
                    if mark is not None:
                        mark()
                    tok = f(tok, torch.tensor([P + i], device=device)).clone()
                    clock.mark()
                    ids.append(tok)
            iv = clock.intervals_ms()
            return time.perf_counter() - t0, iv, torch.cat(ids, 1).tolist()

        common.reset_peak_memory(device)
        t0 = time.perf_counter()
        try:
            once(min(new_tokens, 4))
        except Exception as e:  # a graph break in the model: gpt-fast's recipe minus fullgraph
            if not use_compile:
                raise
            note = f"; fullgraph=False ({type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})"
            torch._dynamo.reset()
            f = compiled(False)
            once(min(new_tokens, 4))
        warmup_s = time.perf_counter() - t0
        _, iv, ids = once(new_tokens)
        what = ("torch.compile(mode='reduce-overhead', fullgraph=True) one-token step, static cache"
                if device.type == "cuda" else
                ("torch.compile one-token step, static cache" if use_compile else
                 "eager static-cache step (torch.compile skipped on CPU: pass --compile)")) + note
        label = "compile" if use_compile else "eager-static"  # not compiled: never labelled "compile"
        row = _summary(label, iv[0] * 1e-3, iv[1:], model.config, B, P, new_tokens, wbytes, dtype,
                       device, warmup_s=warmup_s, compile_s=warmup_s if use_compile else None, detail=what)
        return row, ids
    finally:
        model.set_backend(orig)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

TABLE = (("peer", "peer"), ("ttft_ms", "TTFT ms"), ("ms_per_token_p50", "ms/tok p50"),
         ("ms_per_token_p90", "ms/tok p90"), ("tokens_per_s", "tok/s"), ("achieved_gbps", "GB/s"),
         ("pct_copy_bw", "% copy BW"), ("peak_mem_gb", "peak GB"), ("warmup_s", "warm-up s"),
         ("same_tokens", "= ours"))


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (a local HF-cache copy, else random weights), "
                        "an HF checkpoint directory, a .pt checkpoint, or 'tiny' (default: gpt2; tiny in quick mode on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; 16 quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128; 16 quick)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--compile", action="store_true", help="use torch.compile for the compile peer on CPU too")
    p.add_argument("--profile", action="store_true",
                   help="also profile ours (torch.profiler): write a chrome trace, print the top kernels")
    p.add_argument("--count-ops", action="store_true",
                   help="only count the kernel launches of one decode step (unfused and fused, greedy and "
                        "sampling; per layer and fixed; gpt2_fast/benchmarks/op_count.py) and exit")


def _profile(model, prompt, new_tokens, device, out_dir, st) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _ours_once(model, prompt, min(new_tokens, 32), device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=12)
    except Exception:  # torch before 2.4 named it self_cuda_time_total
        sort = "self_cuda_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=12)
    trace_dir = out_dir or tempfile.mkdtemp(prefix="gpt2_fast_trace_")
    os.makedirs(trace_dir, exist_ok=True)
    trace = common.result_path(trace_dir, "decode-trace", st, "json")
    prof.export_chrome_trace(trace)
    print(f"\ntop kernels of ours ({min(new_tokens, 32)} tokens, sorted by {sort}):\n{table}")
    print(f"chrome trace: {trace} (open in chrome://tracing or ui.perfetto.dev)")
    return {"trace": trace, "top": table}


def run(args, device: torch.device, out_dir: Optional[str]) -> dict:
    quick = args.quick
    spec = args.model or (TINY if quick and device.type == "cpu" else "gpt2")
    P = args.prompt_len if args.prompt_len is not None else (16 if quick else 128)
    N = args.new_tokens if args.new_tokens is not None else (16 if quick else 128)
    if args.batch < 1 or P < 1 or N < 2:
        raise ValueError(f"need --batch >= 1, --prompt-len >= 1 and --new-tokens >= 2; "
                         f"got {args.batch}, {P}, {N}")
    peers = tuple(x.strip() for x in args.peers.split(",") if x.strip())
    bad = [x for x in peers if x not in PEERS]
    if bad or not peers:
        raise ValueError(f"--peers must be a comma list of {', '.join(PEERS)}; got {args.peers!r}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    st = common.stamp(device, quick)
    print(common.stamp_line(st), flush=True)
    model, source = load_model(spec, device, dtype)
    cfg = model.config
    if P + N > cfg.block_size:
        raise ValueError(f"--prompt-len {P} + --new-tokens {N} exceeds the model's block_size {cfg.block_size}")
    print(f"model {spec}: {cfg.n_layer} layers x {cfg.n_embd}, {source}; {dtype}, batch {args.batch}, "
          f"prompt {P}, {N} new tokens, greedy", flush=True)
    if getattr(args, "count_ops", False):
        from .op_count import report
        result = {"kind": "decode-op-count", "stamp": st, "model": spec, "dtype": str(dtype),
                  "config": cfg.to_dict(), "rows": report(model, batch=args.batch)}
        if out_dir:
            slug = common.slug(os.path.basename(spec.rstrip('/')))
            result["paths"] = {"json": common.write_json(common.result_path(out_dir, f"decode-ops-{slug}", st, "json"),
                                                         result)}
        return result
    ceilings = common.measure_ceilings(device, quick=quick)
    wbytes = weight_bytes(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, P), generator=g).tolist()

    rows, ids = [], {}
    result = {"kind": "decode", "stamp": st, "ceilings": ceilings, "quick": quick,
              "model": spec, "weights": source, "config": cfg.to_dict(), "dtype": str(dtype),
              "batch": args.batch, "prompt_len": P, "new_tokens": N, "weight_bytes": wbytes, "rows": rows}
    json_path = (common.result_path(out_dir, f"decode-{common.slug(os.path.basename(spec.rstrip('/')))}", st, "json")
                 if out_dir else None)
    for peer in peers:
        try:
            if peer == "ours":
                row, ids[peer] = run_ours(model, prompt, N, device, dtype, wbytes, P)
            elif peer == "hf":
                row, ids[peer] = run_hf(model, prompt, N, device, dtype, wbytes, P)
            elif peer in ("ort", "ct2"):
                row, ids[peer] = run_cpu_peer(peer, model, prompt, N, device, dtype, wbytes, P)
            else:
                row, ids[peer] = run_compile(model, prompt, N, device, dtype, wbytes, P, args.compile)
                ids[row["peer"]] = ids[peer]
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            row = dict(peer=peer, status="skipped", reason=f"failed here: {type(e).__name__}: {msg}")
        if row.get("status") == "ok" and row.get("achieved_gbps"):
            row["pct_copy_bw"] = 100 * row["achieved_gbps"] / ceilings["copy_gbps"]
        rows.append(row)
        print(f"  {peer:8s} " + (f"{common.fmt(row['ms_per_token_p50'])} ms/token (p50), TTFT "
                                f"{common.fmt(row['ttft_ms'])} ms" if row["status"] == "ok"
                                else f"skipped: {row['reason']}"), flush=True)
        if json_path:  # after every peer: a run cut short by a timeout keeps what it measured
            common.write_json(json_path, result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:  # greedy decoding of the same weights: the peers should agree token for token
        if row["status"] == "ok" and row["peer"] != "ours" and ids.get("ours") is not None:
            a, b = ids["ours"], ids.get(row["peer"])
            row["same_tokens"] = None if b is None else ("yes" if a == b else
                                                         f"no ({_agree(a, b)} first tokens agree)")
    ok = [r for r in rows if r["status"] == "ok"]
    print()
    print(common.format_table(ok, TABLE))
    for r in rows:
        if r["status"] != "ok":
            print(f"skipped {r['peer']}: {r['reason']}")
    if device.type == "cpu":
        print(f"\n{st['note'].upper()}")
    if args.profile:
        result["profile"] = _profile(model, prompt, N, device, out_dir, st)
    if json_path:
        path = common.write_json(json_path, result)
        result["paths"] = {"json": path}
        print(f"wrote {path}")
    return result


def _agree(a, b) -> int:
    n = 0
    for x, y in zip(a[0], b[0]):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    from .cli import main
    raise SystemExit(main(["decode"] + sys.argv[1:]))

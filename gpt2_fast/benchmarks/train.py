"""Training throughput: tokens/s, MFU and peak memory of one optimizer step, beside the peers.

Peers, each a fresh model of the same config, fp32 master weights, AdamW (fused on CUDA), bf16
autocast on CUDA (fp32 on CPU), random tokens:
  ours          our GPT on its default backend ("auto": the fused kernels), model(x, y,
                return_logits=False): the LM head fused with the loss
  torch-eager   our GPT on the torch backend (reference ops), eager
  torch-compile our GPT on the torch backend under torch.compile (nanoGPT-style)
  hf            transformers GPT2LMHeadModel (SDPA attention), loss from labels
  ours-compile  (optional) ours under torch.compile
One step = forward + backward + optimizer step + zero_grad. After warm-up steps (compilation and
autotuning happen there; their time is reported as warmup_s), `--steps` steps are timed
between two device syncs.

MFU: tokens/s x FLOPs per token / peak, FLOPs per token = 6 N + 12 L C T (N the parameters
without wpe, L layers, C width, T sequence length; PaLM appendix B / nanoGPT's estimate_mfu),
against the datasheet bf16 peak (H100/H200 989 TFLOP/s, A100 312) and against the matmul rate
measured in the same run.
"""
from __future__ import annotations

import gc
import sys
import time
from typing import Optional

import torch

from ..config import PRESETS, GPTConfig
from . import common

TINY = "tiny"
TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=128)
PEERS = ("ours", "torch-eager", "torch-compile", "hf", "ours-compile")
DEFAULT_PEERS = ("ours", "torch-eager", "hf", "torch-compile")  # compile last: the longest warm-up


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * seq_len


def _config(spec: str) -> GPTConfig:
    if spec == TINY:
        return GPTConfig(**TINY_CONFIG)
    if spec in PRESETS:
        return GPTConfig.from_name(spec)
    raise ValueError(f"--model must be one of {', '.join(PRESETS)} or {TINY} (weights are random: "
                     f"speed does not depend on them); got {spec!r}")


def _build(peer: str, cfg: GPTConfig, device: torch.device):
    """(module, loss_fn(x, y) -> loss, n_params) for one peer."""
    torch.manual_seed(0)
    if peer == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel
        from ..hf import config_to_hf
        hf_cfg = config_to_hf(cfg)
        hf_cfg.pop("architectures", None)
        hf_cfg.pop("model_type", None)
        with torch.device(device):
            m = GPT2LMHeadModel(GPT2Config(**hf_cfg))
        m = m.to(device)
        m.train()

        def loss_fn(x, y):
            return m(input_ids=x, labels=x).loss
        n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()
        return m, loss_fn, n
    from ..model import GPT
    with torch.device(device):  # initialise on the device (seconds saved for the big presets)
        m = GPT(GPTConfig(**{**cfg.to_dict(), "backend": "torch" if peer.startswith("torch") else cfg.backend}))
    m = m.to(device).train()
    n = m.num_params()
    fwd = torch.compile(m) if peer.endswith("compile") else m

    def loss_fn(x, y):
        return fwd(x, y, return_logits=False)[1]
    return m, loss_fn, n


def run_peer(peer: str, cfg: GPTConfig, device: torch.device, batch: int, seq: int, steps: int,
             warmup: int) -> dict:
    common.reset_peak_memory(device)
    model, loss_fn, n_params = _build(peer, cfg, device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, **({"fused": True} if cuda else {}))
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)

    def step() -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    first = step()
    for _ in range(warmup - 1):
        step()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    common.sync(device)
    dt = time.perf_counter() - t0
    tok_s = batch * seq * steps / dt
    row = dict(peer=peer, status="ok", tokens_per_s=tok_s, ms_per_step=dt / steps * 1e3,
               steps=steps, warmup_steps=warmup, warmup_s=warmup_s,
               model_tflops=tok_s * flops_per_token(cfg, n_params, seq) / 1e12,
               peak_mem_gb=common.peak_memory_gb(device), loss_first=float(first), loss_last=float(last),
               n_params=n_params)
    if not all(map(torch.isfinite, (first, last))):
        row["warning"] = "non-finite loss"
    del model, opt, loss_fn
    return row


TABLE = (("peer", "peer"), ("tokens_per_s", "tokens/s"), ("ms_per_step", "ms/step"),
         ("mfu_datasheet_pct", "MFU % datasheet"), ("mfu_measured_pct", "MFU % measured mm"),
         ("peak_mem_gb", "peak GB"), ("warmup_s", "warm-up s"), ("loss_last", "loss"))


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help=f"{', '.join(PRESETS)} or {TINY}, random weights (default gpt2; tiny in quick mode on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 16 (2 in quick mode on CPU)")
    p.add_argument("--seq", type=int, default=None, help="default 1024 (64 in quick mode on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 quick)")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--compile", action="store_true",
                   help="run the torch.compile peers on CPU in quick mode too (minutes of compiling)")


def run(args, device: torch.device, out_dir: Optional[str]) -> dict:
    quick = args.quick
    cpu_quick = quick and device.type == "cpu"
    spec = args.model or (TINY if cpu_quick else "gpt2")
    cfg = _config(spec)
    pick = lambda given, default: default if given is None else given  # noqa: E731  (0 is an error, not "default")
    batch = pick(args.batch, 2 if cpu_quick else 16)
    seq = pick(args.seq, 64 if cpu_quick else 1024)
    steps = pick(args.steps, 3 if quick else 10)
    warmup = pick(args.warmup, 1 if quick else 3)
    if min(batch, seq, steps, warmup) < 1 or seq > cfg.block_size:
        raise ValueError(f"need --batch, --steps, --warmup >= 1 and 1 <= --seq <= {cfg.block_size}; "
                         f"got batch {batch}, seq {seq}, steps {steps}, warmup {warmup}")
    peers = tuple(x.strip() for x in args.peers.split(",") if x.strip())
    bad = [x for x in peers if x not in PEERS]
    if bad or not peers:
        raise ValueError(f"--peers must be a comma list of {', '.join(PEERS)}; got {args.peers!r}")

    st = common.stamp(device, quick)
    print(common.stamp_line(st), flush=True)
    print(f"model {spec} ({cfg.n_layer} layers x {cfg.n_embd}, random weights), batch {batch} x seq {seq}, "
          f"{steps} timed steps after {warmup} warm-up, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW", flush=True)
    ceilings = common.measure_ceilings(device, quick=quick)
    measured = ceilings.get("matmul_tflops_bf16" if device.type == "cuda" else "matmul_tflops_fp32")
    datasheet = common.datasheet_peak_tflops(st["device"]) if device.type == "cuda" else None
    rows: list = []
    result = {"kind": "train", "stamp": st, "ceilings": ceilings, "quick": quick, "model": spec,
              "config": cfg.to_dict(), "batch": batch, "seq": seq, "datasheet_tflops": datasheet,
              "measured_matmul_tflops": measured, "rows": rows}
    json_path = common.result_path(out_dir, f"train-{spec}", st, "json") if out_dir else None
    for peer in peers:
        if peer.endswith("compile") and cpu_quick and not args.compile:
            row = dict(peer=peer, status="skipped", reason="torch.compile skipped on CPU in quick mode "
                       "(compiling takes minutes here); pass --compile")
        else:
            try:
                row = run_peer(peer, cfg, device, batch, seq, steps, warmup + (1 if peer.endswith("compile") else 0))
            except Exception as e:
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                row = dict(peer=peer, status="skipped", reason=f"failed here: {type(e).__name__}: {msg}")
        if row["status"] == "ok":
            row["mfu_datasheet_pct"] = 100 * row["model_tflops"] / datasheet if datasheet else None
            row["mfu_measured_pct"] = 100 * row["model_tflops"] / measured if measured else None
        rows.append(row)
        print(f"  {peer:14s} " + (f"{common.fmt(row['tokens_per_s'])} tokens/s" if row["status"] == "ok"
                                  else f"skipped: {row['reason']}"), flush=True)
        if json_path:  # after every peer: a run cut short by a timeout keeps what it measured
            common.write_json(json_path, result)
        if peer.endswith("compile"):
            torch._dynamo.reset()  # drop compiled graphs that keep the peer's model alive
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in rows if r["status"] == "ok"]
    print()
    print(common.format_table(ok, TABLE))
    print(f"MFU against the datasheet bf16 peak ({common.fmt(datasheet)} TFLOP/s) and the measured "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul rate ({common.fmt(measured)} TFLOP/s)")
    for r in rows:
        if r["status"] != "ok":
            print(f"skipped {r['peer']}: {r['reason']}")
    if device.type == "cpu":
        print(f"\n{st['note'].upper()}")
    if json_path:
        path = common.write_json(json_path, result)
        result["paths"] = {"json": path}
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    from .cli import main
    raise SystemExit(main(["train"] + sys.argv[1:]))

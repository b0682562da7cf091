"""Benchmarks behind `gpt2-fast bench kernels|decode|train` and bench/test_bench_*.py.

common.py   timing (CUDA events with the L2 flushed, or a CPU wall-clock fallback), the ceilings
            measured in the same run (copy bandwidth, bf16/fp32 matmul rate), the stamp (device,
            versions, git sha, date) and the JSON/CSV/PNG writers
kernels.py  per-op microbenchmarks: providers (torch eager, torch.compile, SDPA backends, Liger,
            ours triton / cuda / cpp) x modes (fwd, bwd, fwd+bwd) x GPT-2 shapes
decode.py   batch-1 inference latency: ours vs HF generate vs a torch.compile static-cache decode
train.py    training throughput and MFU: ours vs our model on the torch backend vs HF
cli.py      the `gpt2-fast bench` subcommand
summary.py  merges a results folder into one JSON and prints the short table (bench/gpu_check.sh)
"""

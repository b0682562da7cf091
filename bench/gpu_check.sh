#!/usr/bin/env bash
# bench/gpu_check.sh: the ONE script to run when a GPU is lent (one device call, <= 8 minutes).
#
#   GPT2_FAST_GIT_SHA=<sha of the tree> bash bench/gpu_check.sh      # results under $OUT, else bench/results/
#
# Stages, each under its own timeout so that one hang cannot eat the budget (a stage that no
# longer fits in what is left is skipped and says so):
#   env      nvidia-smi, python/torch/triton versions, `gpt2-fast info`
#   build    pip install --no-build-isolation --no-deps --no-index -e .  (builds gpt2_fast._C for
#            this GPU's arch only); if that fails: a pure-Python install + the JIT path (GPT2_FAST_JIT=1)
#   tests    pytest -x -q tests on CUDA (time-capped)
#   kernels  gpt2-fast bench kernels --quick (real shapes, short timing on CUDA), gpt2 and gpt2-xl
#            widths, T=1024, every provider but
#            torch.compile (its compile time per shape does not fit here; decode/train measure it)
#   decode   gpt2-fast bench decode, gpt2 (ours, HF, torch.compile) and gpt2-xl (ours, HF), random weights
#   train    gpt2-fast bench train, gpt2 B16 T1024 (ours, torch eager, torch.compile, HF)
#   summary  merges the JSONs into <date>-<gpu>.json and prints the short table, last
# It needs only what the GPU image has (Python 3.12, torch 2.11 CUDA 13.0, triton 3.6,
# transformers, pytest, pytest-benchmark, matplotlib, ninja, nvcc); nothing is downloaded.
# Without a CUDA GPU it says so and exits 0 (set GPU_CHECK_CPU=1 to run the CPU quick mode instead).
# Files written (at most 8, flat, so that all of them come back from a device call): kernels-*.json/
# .csv/.png, decode-gpt2-*.json, decode-gpt2-xl-*.json, train-gpt2-*.json, gpu_check.log,
# <date>-<gpu>.json (the merged results, to commit as bench/results/<date>-<gpu>.json).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET_S:-470}     # seconds for everything; the device call allows 8 minutes
START=$(date +%s)
STAGES=()                             # "name=status" pairs for the summary
: >"$LOG"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_stage NAME CAP_S CMD...: runs CMD under timeout min(CAP_S, what is left - 15 s for the summary)
run_stage() {
    local name=$1 cap=$2; shift 2
    local t; t=$(left); t=$(( t - 15 )); (( t > cap )) && t=$cap
    if (( t < 20 )); then
        say "$name: SKIPPED (only $(left) s of the budget left)"; STAGES+=("$name=skipped: no time left"); return 0
    fi
    say "$name: start (timeout ${t}s): $*"
    local s0; s0=$(date +%s)
    timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - s0 ))
    if (( rc == 0 )); then STAGES+=("$name=ok (${took}s)"); say "$name: ok (${took}s)"
    elif (( rc == 124 || rc == 137 )); then STAGES+=("$name=TIMED OUT after ${t}s"); say "$name: TIMED OUT after ${t}s"
    else STAGES+=("$name=FAILED rc=$rc (${took}s)"); say "$name: FAILED rc=$rc (${took}s), see gpu_check.log"
    fi
    return $rc
}

export GPT2_FAST_GIT_SHA=${GPT2_FAST_GIT_SHA:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- is there a GPU? ---------------------------------------------------------------------------
if ! why=$("$PY" -c "import sys, torch
print(f'torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device')
sys.exit(0 if torch.cuda.is_available() else 1)" 2>&1); then
    why=$(echo "$why" | tail -1)
    smi=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1 | head -3 || echo "nvidia-smi not found")
    echo "gpu_check: NO GPU HERE: $why; $smi."
    echo "gpu_check: nothing was built or measured on a GPU. This script is meant for a lent GPU machine."
    if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then
        echo "gpu_check: GPU_CHECK_CPU=1: running the CPU quick mode instead (CPU figures, not GPU figures)."
        for cmd in kernels decode train; do
            "$PY" -m gpt2_fast bench "$cmd" --quick --out "$OUT_DIR" || echo "gpu_check: bench $cmd failed (rc $?)"
        done
    else
        echo "gpu_check: for CPU figures run: $PY -m gpt2_fast bench kernels|decode|train --quick (or GPU_CHECK_CPU=1 $0)"
    fi
    rm -f "$LOG"
    exit 0
fi

# ---- env ---------------------------------------------------------------------------------------
say "repo $ROOT, git $GPT2_FAST_GIT_SHA, python $PY, results -> $OUT_DIR, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1 || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
export GPT2_FAST_CUDA_ARCHS=${GPT2_FAST_CUDA_ARCHS:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ---- build -------------------------------------------------------------------------------------
cleanup_link=0
run_stage build 150 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
build_rc=$?
if (( build_rc != 0 )); then
    say "build: falling back to a pure-Python install and the JIT extension build (GPT2_FAST_JIT=1)"
    if (( build_rc == 124 || build_rc == 137 )); then
        say "build: the compile timed out, so the JIT build (same sources) is skipped: ours = triton only"
        export GPT2_FAST_SKIP_EXT=1
    else
        export GPT2_FAST_JIT=1
    fi
    if ! GPT2_FAST_SKIP_EXT=1 timeout 60 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$LOG" 2>&1; then
        say "build: pip cannot install the package here; using the tree in place (PYTHONPATH + gpt2_fast/kernels link)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        if [ -d gpt2_fast ] && [ ! -e gpt2_fast/kernels ]; then ln -s ../kernels gpt2_fast/kernels && cleanup_link=1; fi
    fi
    if [ "${GPT2_FAST_JIT:-0}" = 1 ] && ! run_stage jit-build 120 "$PY" -c "import gpt2_fast.extension as e; r = e.unavailable_reason('cuda'); print('extension:', r or 'usable'); raise SystemExit(1 if r else 0)"; then
        say "build: no extension; later stages run without it (GPT2_FAST_SKIP_EXT=1), ours = triton only"
        export GPT2_FAST_SKIP_EXT=1 GPT2_FAST_JIT=0  # else every later process would retry the JIT build
    fi
fi
timeout 60 "$PY" -m gpt2_fast info 2>&1 | tee -a "$LOG" || true

# ---- tests -------------------------------------------------------------------------------------
export GPT2_FAST_TRITON_AUTOTUNE=0  # one fixed config per kernel: autotuning every test shape is too slow
run_stage tests 80 "$PY" -m pytest -x -q ${GPU_CHECK_PYTEST_ARGS:-} tests
unset GPT2_FAST_TRITON_AUTOTUNE       # the benchmarks autotune
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | tail -5 | sed 's/^/  /'

# ---- benchmarks --------------------------------------------------------------------------------
run_stage kernels 70 "$PY" -m gpt2_fast bench kernels --quick --presets gpt2,gpt2-xl --seqs 1024 \
    --providers torch,torch-native,sdpa-flash,sdpa-cudnn,sdpa-efficient,sdpa-math,liger,triton,cuda --out "$OUT_DIR"
run_stage decode-gpt2 55 "$PY" -m gpt2_fast bench decode --full --model gpt2 --batch 1 --prompt-len 128 \
    --new-tokens 128 --peers ours,hf,compile --out "$OUT_DIR"
run_stage decode-gpt2-xl 30 "$PY" -m gpt2_fast bench decode --full --model gpt2-xl --batch 1 --prompt-len 128 \
    --new-tokens 64 --peers ours,hf --out "$OUT_DIR"
run_stage train 110 "$PY" -m gpt2_fast bench train --full --model gpt2 --batch 16 --seq 1024 --steps 10 \
    --warmup 3 --out "$OUT_DIR"

# ---- summary (printed last) --------------------------------------------------------------------
[ "$cleanup_link" = 1 ] && rm -f gpt2_fast/kernels
stages_json=$(mktemp)
"$PY" - "$stages_json" "${STAGES[@]}" <<'EOF'
import json, sys
json.dump(dict(s.split("=", 1) for s in sys.argv[2:]), open(sys.argv[1], "w"))
EOF
say "done in $(( $(date +%s) - START ))s; summary:"
echo
timeout 60 "$PY" -m gpt2_fast.benchmarks.summary "$OUT_DIR" --stages "$stages_json" 2>&1 | tee -a "$LOG"
rm -f "$stages_json"
exit 0

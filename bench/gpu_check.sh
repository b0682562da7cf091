#!/usr/bin/env bash
# bench/gpu_check.sh: the ONE script to run when a GPU is lent, in ONE device call (600 s at most).
#
#   GPT2_FAST_GIT_SHA=<sha> bash bench/gpu_check.sh          # results under $OUT, else bench/results/
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh               # the same flow on CPU, tiny shapes (CI)
#
# Everything, the summary included, ends inside GPU_CHECK_BUDGET_S (default 480 s: a 600 s device call
# also pays Python start-up and the file transfer). Stages run in priority order, each under
# `timeout` capped by what is left before the summary's reserve (GPU_CHECK_SUMMARY_S, default 30 s);
# a stage that no longer fits is skipped and says so; one hang cannot eat the lease.
#   preconditions  sha, gcc, Python.h, tiktoken, pip, nvcc + toolkit paths, free disk, torch, GPU
#   build          setup.py build_ext --inplace for this GPU's arch (CUDA_HOME / CPATH as in
#                  .ci/cuda_compile_check.sh, via .ci/cuda_env.sh); on failure or timeout the later
#                  stages run without the extension (GPT2_FAST_SKIP_EXT=1): ours = triton
#   tests-kernels  pytest -k cuda on the kernel test files first (--maxfail=5 -rfE --durations=20,
#                  one fixed Triton config), the slow exact-fp32 compiles deselected
#   ab             every side of every gpt2_fast/choices.py row, measured in this run (bench/gpu_check.py)
#   kernels        gpt2-fast bench kernels, gpt2 and gpt2-xl widths, T=1024, every provider but torch.compile
#   decode-gpt2    gpt2-fast bench decode (ours, HF, torch.compile); train: gpt2 B16 T1024
#   tests-model    pytest -k cuda on the other test files; decode-gpt2-xl; tests-slow (the deferred ones)
#   summary        merged JSON + the short table + the A/B table, printed last (bench/gpu_check.py)
# The package is imported from a symlink tree in a temp dir (gpt2_fast/ + kernels/ as
# gpt2_fast.kernels + csrc/): nothing is pip-installed and nothing is downloaded.
# The git sha: GPT2_FAST_GIT_SHA, else a .git_sha file at the tree's root, else git, else "unknown".
# Files (under $OUT): gpu_check.log, gpu_check.json (stages, preconditions, A/B, sha), kernels-*,
# decode-*, train-*, <date>-<gpu>.json (to commit as bench/results/), ab.json, git_sha.txt.
# Exit status: 1 when a stage FAILED (a timeout or a skip is reported, not failed), else 0.
# Dry run (GPU_CHECK_DRY_RUN=1; budget default 300 s): CPU, TRITON_INTERPRET=1, tiny shapes, two
# small test files, the build given GPU_CHECK_DRY_BUILD_S (8 s) so that it times out and the
# no-extension fallback runs; nothing is built in place and results go to a temp dir unless $OUT.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
START=$(date +%s)
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 300 || echo 480)}
RESERVE=${GPU_CHECK_SUMMARY_S:-30}
DEADLINE=$(( START + BUDGET - RESERVE ))  # no stage runs past this (+ 5 s to kill it)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; fi
PY=$(command -v "$PY" || echo "$PY")
# no GPU (and no dry run): say so and write nothing
if [ "$DRY" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "[gpu_check] NO GPU HERE: torch sees no CUDA device; nothing was built or measured on a GPU. (GPU_CHECK_DRY_RUN=1 runs the flow on CPU.)"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${OUT:-}" ]; then OUT_DIR=$OUT; elif [ "$DRY" = 1 ]; then OUT_DIR=$WORK/out; else OUT_DIR=bench/results; fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/gpu_check.log
: >"$LOG"
STAGES=()   # "name=status"
FAILED=0

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_stage NAME CAP CMD...: CMD under timeout min(CAP, DEADLINE - now), output to the log; rc 125 = skipped
run_stage() {
    local name=$1 cap=$2; shift 2
    local t=$(( DEADLINE - $(date +%s) ))
    if (( t < 10 )); then
        say "$name: SKIPPED ($t s left before the summary)"
        STAGES+=("$name=skipped: no time left"); return 125
    fi
    (( t > cap )) && t=$cap
    say "$name: start (timeout ${t}s): $*"
    local s0=$(date +%s) rc
    (cd "$WORK/pkg" && timeout -k 5 "$t" "$@") >>"$LOG" 2>&1
    rc=$?
    local took=$(( $(date +%s) - s0 ))
    if (( rc == 0 )); then STAGES+=("$name=ok (${took}s)"); say "$name: ok (${took}s)"
    elif (( rc == 124 || rc == 137 )); then STAGES+=("$name=TIMED OUT after ${t}s"); say "$name: TIMED OUT after ${t}s"
    elif [[ $name == tests* ]] && (( rc == 5 )); then STAGES+=("$name=ok: no test selected (${took}s)"); say "$name: no test selected"; rc=0
    else STAGES+=("$name=FAILED rc=$rc (${took}s)"); say "$name: FAILED rc=$rc (${took}s), see gpu_check.log"; FAILED=1
    fi
    return $rc
}

# the package as a symlink tree: $WORK/pkg/gpt2_fast/* -> gpt2_fast/*, gpt2_fast/kernels -> kernels/,
# csrc -> csrc/ (what setup.py's package_dir does, without installing anything)
make_pkg_tree() {
    rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg/gpt2_fast"
    local f
    for f in "$ROOT"/gpt2_fast/* ; do ln -s "$f" "$WORK/pkg/gpt2_fast/$(basename "$f")"; done
    [ -e "$WORK/pkg/gpt2_fast/kernels" ] || ln -s "$ROOT/kernels" "$WORK/pkg/gpt2_fast/kernels"
    ln -s "$ROOT/csrc" "$WORK/pkg/csrc"
    export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
}

# ---- preconditions (logged first) ----------------------------------------------------------------
export GPT2_FAST_GIT_SHA=${GPT2_FAST_GIT_SHA:-$(timeout 20 "$PY" bench/gpu_check.py sha "$ROOT" 2>/dev/null || echo unknown)}
echo "$GPT2_FAST_GIT_SHA" >"$OUT_DIR/git_sha.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset GPT2_FAST_BACKEND
make_pkg_tree
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE_ARGS=(--device cpu); TEST_K=${GPU_CHECK_TEST_K:-"not cuda"}
else
    DEVICE_ARGS=(); TEST_K=${GPU_CHECK_TEST_K:-cuda}
fi
say "repo $ROOT, git $GPT2_FAST_GIT_SHA, python $PY, results -> $OUT_DIR, budget ${BUDGET}s (summary reserve ${RESERVE}s)$([ "$DRY" = 1 ] && echo ', DRY RUN on CPU')"
# shellcheck source=../.ci/cuda_env.sh
source "$ROOT/.ci/cuda_env.sh" && cuda_env "$PY" && cuda_env_report 2>&1 | sed 's/^/precondition /' | tee -a "$LOG"
(cd "$WORK/pkg" && timeout 60 "$PY" "$ROOT/bench/gpu_check.py" preconditions) 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
export GPT2_FAST_CUDA_ARCHS=${GPT2_FAST_CUDA_ARCHS:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ---- build ---------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then  # into the temp dir, given too little time on purpose: the fallback runs
    run_stage build "${GPU_CHECK_DRY_BUILD_S:-8}" "$PY" "$ROOT/setup.py" -q build_ext \
        --build-temp "$WORK/build" --build-lib "$WORK/lib"
else
    run_stage build 200 bash -c "cd '$ROOT' && '$PY' setup.py -q build_ext --inplace"
fi
build_rc=$?
make_pkg_tree  # again: links the freshly built gpt2_fast/_C*.so
if (( build_rc != 0 )); then
    say "build: no extension for the later stages (GPT2_FAST_SKIP_EXT=1): ours = triton (+ torch)"
    export GPT2_FAST_SKIP_EXT=1
fi
(cd "$WORK/pkg" && timeout 60 "$PY" -m gpt2_fast info) >>"$LOG" 2>&1 || say "gpt2-fast info failed (see log)"

# ---- tests: kernel files first, -k cuda, slow compiles deferred ------------------------------------
KERNEL_TESTS=(layer_norm bias_gelu cross_entropy flash_attention decode_attention decode_gemv sampler quant
              extension model_triton)
SLOW_K=${GPU_CHECK_SLOW_K:-"head_dims and (80 or 128)"}   # exact-fp32 D=80/128 attention: 14-49 s compiles each
DRY_TESTS=${GPU_CHECK_DRY_TESTS:-"bias_gelu config"}
kfiles=(); mfiles=()
for k in "${KERNEL_TESTS[@]}"; do [ -f "tests/test_$k.py" ] && kfiles+=("$ROOT/tests/test_$k.py"); done
for f in tests/test_*.py; do [[ " ${kfiles[*]} " == *" $ROOT/$f "* ]] || mfiles+=("$ROOT/$f"); done
if [ "$DRY" = 1 ]; then
    keep() { local f; for f in "$@"; do [[ " $DRY_TESTS " == *" $(basename "$f" .py | sed 's/^test_//') "* ]] && echo "$f"; done; }
    mapfile -t kfiles < <(keep "${kfiles[@]}"); mapfile -t mfiles < <(keep "${mfiles[@]}")
fi
PYTEST=("$PY" -m pytest -p no:cacheprovider --maxfail=5 -rfE --durations=20 --continue-on-collection-errors)
report_tests() { grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|errors?|skipped|deselected)" "$LOG" | tail -6 | sed 's/^/  /'; }
export GPT2_FAST_TRITON_AUTOTUNE=0   # one fixed config per kernel: autotuning every test shape is too slow
run_stage tests-kernels 150 "${PYTEST[@]}" -k "($TEST_K) and not ($SLOW_K)" "${kfiles[@]}"; report_tests

# ---- A/B of gpt2_fast/choices.py, then the benchmarks -----------------------------------------------
export GPT2_FAST_TRITON_AUTOTUNE=${GPU_CHECK_AB_AUTOTUNE:-0}  # A/B: one fixed config (autotuning each side does not fit)
AB_CAP=$([ "$DRY" = 1 ] && echo 130 || echo 170)  # dry run: every row, and time for every later stage
ab_deadline=$(( $(date +%s) + AB_CAP - 10 )); (( ab_deadline > DEADLINE - 5 )) && ab_deadline=$(( DEADLINE - 5 ))
run_stage ab "$AB_CAP" "$PY" "$ROOT/bench/gpu_check.py" ab "$OUT_DIR" --deadline "$ab_deadline" \
    --cap "${GPU_CHECK_AB_SIDE_S:-$([ "$DRY" = 1 ] && echo 30 || echo 60)}" $([ "$DRY" = 1 ] && echo --dry-run)
unset GPT2_FAST_TRITON_AUTOTUNE     # the benchmarks autotune
if [ "$DRY" = 1 ]; then  # the quick modes' own tiny CPU shapes
    KERNEL_ARGS=(--quick --ops layer_norm,bias_gelu --providers torch,triton); XL=gpt2; TRAIN_ARGS=(--quick)
    DECODE_ARGS=(--peers ours,hf); XL_ARGS=(--peers ours)
else
    KERNEL_ARGS=(--quick --presets gpt2,gpt2-xl --seqs 1024
                 --providers torch,torch-native,sdpa-flash,sdpa-cudnn,sdpa-efficient,sdpa-math,liger,triton,cuda)
    XL=gpt2-xl; TRAIN_ARGS=(--full --batch 16 --seq 1024 --steps 10 --warmup 3)
    DECODE_ARGS=(--prompt-len 128 --new-tokens 128 --peers ours,hf,compile)
    XL_ARGS=(--prompt-len 128 --new-tokens 64 --peers ours,hf)
fi
run_stage kernels 70 "$PY" -m gpt2_fast bench kernels "${KERNEL_ARGS[@]}" "${DEVICE_ARGS[@]}" --out "$OUT_DIR"
run_stage decode-gpt2 55 "$PY" -m gpt2_fast bench decode --quick --model gpt2 --batch 1 "${DECODE_ARGS[@]}" \
    "${DEVICE_ARGS[@]}" --out "$OUT_DIR"
run_stage train 110 "$PY" -m gpt2_fast bench train --model gpt2 "${TRAIN_ARGS[@]}" "${DEVICE_ARGS[@]}" --out "$OUT_DIR"

# ---- what is left: the other tests, gpt2-xl decode, the deferred slow compiles ----------------------
export GPT2_FAST_TRITON_AUTOTUNE=0
run_stage tests-model 90 "${PYTEST[@]}" -k "($TEST_K) and not ($SLOW_K)" "${mfiles[@]}"; report_tests
unset GPT2_FAST_TRITON_AUTOTUNE
run_stage decode-gpt2-xl 40 "$PY" -m gpt2_fast bench decode --quick --model "$XL" --batch 1 "${XL_ARGS[@]}" \
    "${DEVICE_ARGS[@]}" --out "$OUT_DIR"
export GPT2_FAST_TRITON_AUTOTUNE=0
run_stage tests-slow 200 "${PYTEST[@]}" -k "($TEST_K) and ($SLOW_K)" "${kfiles[@]}"; report_tests

# ---- summary (printed last, inside the budget) ------------------------------------------------------
stages_json=$WORK/stages.json
printf '%s\n' "${STAGES[@]}" | "$PY" -c "import json, sys; json.dump(dict(l.rstrip('\n').split('=', 1) for l in sys.stdin if '=' in l), open(sys.argv[1], 'w'), indent=1)" "$stages_json"
left=$(( START + BUDGET - $(date +%s) - 3 ))
(( left < 5 )) && left=5
say "stages done in $(( $(date +%s) - START ))s; summary (timeout ${left}s):"
extra="{\"git_sha\": \"$GPT2_FAST_GIT_SHA\", \"budget_s\": $BUDGET, \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false)}"
(cd "$WORK/pkg" && timeout -k 2 "$left" "$PY" "$ROOT/bench/gpu_check.py" summary "$OUT_DIR" \
    --stages "$stages_json" --extra "$extra") 2>&1 | tee -a "$LOG"
rc=$?
if (( rc == 124 || rc == 137 )); then say "summary: cut at ${left}s (the budget): the merged table may be missing"
elif (( rc != 0 )) || [ ! -s "$OUT_DIR/gpu_check.json" ]; then say "summary: FAILED rc=$rc"; FAILED=1
fi
say "done in $(( $(date +%s) - START ))s of ${BUDGET}s; $( (( FAILED )) && echo 'some stage FAILED' || echo 'no stage failed'); results in $OUT_DIR"
exit $FAILED

#!/usr/bin/env bash
# sm_90 compile check of every Triton kernel (tests/sm90_compile.py: registers, spills, shared memory
# per kernel and autotune config; a spill or > 227 KB of shared memory fails) under two Tritons, side
# by side (one CPU core each): the pinned one (.venv, `make test`'s) and 3.6.0, the GPU image's, in a
# venv of its own. Run by .ci/run; users' `make test` does not need it.
#
#   TRITON36_VENV   default /work/.venv-triton36: torch==2.13.0 (the CPU wheel on disk) + triton==3.6.0
#                   + numpy; created when missing (~2.5 min, 1.6 GB), reused after
#   SM90_OUT        where the JSON tables go (default: a temp dir, removed)
#   SM90_ARGS       extra arguments for both runs (e.g. "--quick")
# Compile-only needs no interpreter (triton 3.6's is broken with numpy 2.4): TRITON_INTERPRET is unset.
# Triton caches the compiled kernels per version under ~/.cache/gpt2_fast/sm90-triton-<version>, so a
# rerun with unchanged kernels takes seconds; the first run on a machine compiles everything.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
unset TRITON_INTERPRET
PY39=${PY39:-.venv/bin/python}
V36=${TRITON36_VENV:-/work/.venv-triton36}
OUTDIR=${SM90_OUT:-$(mktemp -d)}
[ -n "${SM90_OUT:-}" ] || trap 'rm -rf "$OUTDIR"' EXIT
mkdir -p "$OUTDIR"

# the pinned triton starts at once, while the 3.6 venv is made (pip is mostly I/O)
"$PY39" tests/sm90_compile.py --json "$OUTDIR/sm90-pinned.json" ${SM90_ARGS:-} >"$OUTDIR/pinned.log" 2>&1 &
pid39=$!

if ! "$V36/bin/python" -c "import triton, torch, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
  echo "sm90_compile: creating $V36 (torch==2.13.0 CPU + triton==3.6.0)"
  python3 -m venv "$V36"
  "$V36/bin/pip" install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 numpy 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
fi
"$V36/bin/python" tests/sm90_compile.py --json "$OUTDIR/sm90-triton36.json" ${SM90_ARGS:-} >"$OUTDIR/triton36.log" 2>&1 &
pid36=$!

rc=0
wait "$pid39" || rc=1
wait "$pid36" || rc=1
for log in pinned triton36; do
  echo "==== sm90_compile ($log): $(grep -v '^sm90_compile: .*\[.*\]: ' "$OUTDIR/$log.log" | head -1)"
  grep -v '^sm90_compile: .*\[.*\]: ' "$OUTDIR/$log.log" | tail -n +2
done
echo "sm90_compile: $([ $rc = 0 ] && echo OK || echo FAILED) (pinned triton and 3.6.0, $(( $(date +%s) - start )) s)"
exit $rc

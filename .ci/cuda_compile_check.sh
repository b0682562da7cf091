#!/usr/bin/env bash
# Compile check of the CUDA sources (csrc/*.cu) on a CPU-only machine: builds gpt2_fast._C with a
# CUDA build of torch into a temp dir and checks that the .so carries sm_90 device code.
# Run by .ci/run after `make test`; users' `make test` does not need it.
#
#   CUDA_VENV    venv with the CUDA torch (default /work/.venv-cuda; created when missing, reused after)
#   CUDA_HOME    default: the toolkit folder nvcc reports (.ci/cuda_env.sh; nvcc on PATH may be a wrapper
#                outside it), else /usr/local/cuda; cublas/cusparse headers come from the venv's
#                nvidia/cu13/include (CPATH), which torch's headers need. bench/gpu_check.sh does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CUDA_VENV=${CUDA_VENV:-/work/.venv-cuda}
# shellcheck source=cuda_env.sh
source "$ROOT/.ci/cuda_env.sh"
TORCH_PIN=${TORCH_PIN:-2.14.1}
start=$(date +%s)

if ! "$CUDA_VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.__version__.startswith('$TORCH_PIN') else 1)" 2>/dev/null; then
  echo "cuda_compile_check: creating $CUDA_VENV (torch==$TORCH_PIN with CUDA)"
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q "torch==$TORCH_PIN" ninja pybind11 setuptools wheel numpy
fi
PY="$CUDA_VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cuda_env "$PY"
cuda_env_report
export TORCH_CUDA_ARCH_LIST=9.0
unset GPT2_FAST_CUDA_ARCHS GPT2_FAST_NO_CUDA GPT2_FAST_SKIP_EXT
export MAX_JOBS=${MAX_JOBS:-2}
"$PY" -c "import torch; print('cuda_compile_check: torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -1

# cuobjdump: on PATH, in CUDA_HOME, else the copy that triton (a torch dependency) ships
CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || { [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"; } || true
[ -n "$CUOBJDUMP" ] || CUOBJDUMP="$SITE/triton/backends/nvidia/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || { echo "cuda_compile_check: FAILED, no cuobjdump found" >&2; exit 1; }

TMP=$(mktemp -d)
[ "${KEEP_BUILD:-0}" = 1 ] && echo "cuda_compile_check: build kept in $TMP" || trap 'rm -rf "$TMP"' EXIT
"$PY" setup.py -q build_ext --build-temp "$TMP/temp" --build-lib "$TMP/lib" 2>&1 | tee "$TMP/build.log" \
  | grep -E "error|warning: .*(narrowing|uninitialized)|building gpt2_fast" || true
SO=$(find "$TMP/lib" -name '_C*.so' | head -1)
if [ -z "$SO" ]; then
  echo "cuda_compile_check: FAILED, no gpt2_fast/_C*.so was built; the end of the build log:" >&2
  tail -40 "$TMP/build.log" >&2
  exit 1
fi
ELF=$("$CUOBJDUMP" --list-elf "$SO" || true)
echo "$ELF"
if ! grep -q "sm_90" <<<"$ELF"; then
  echo "cuda_compile_check: FAILED, $SO carries no sm_90 device code" >&2
  exit 1
fi
# the CUDA kernels are there, by name
SYMS=$("$CUOBJDUMP" --list-text "$SO" | tr -d ' ' || true)
for k in layer_norm_fwd_kernel layer_norm_bwd_kernel bias_gelu_fwd_kernel bias_gelu_bwd_kernel \
         flash_fwd_wmma_kernel decode_split_kernel; do
  grep -q "$k" <<<"$SYMS" || { echo "cuda_compile_check: FAILED, kernel $k is missing from the sm_90 code" >&2; exit 1; }
done
# Accurate math (gpt2_fast/build_ext.py builds without --use_fast_math). Fast math's fingerprints in
# the sm_90 SASS: tanh.approx (MUFU.TANH) anywhere, and flush-to-zero on (nearly) every FADD/FMUL/FFMA
# of a kernel (-ftz=true); accurate library code uses a few .FTZ instructions on purpose (the slow path
# of an IEEE division), so a kernel fails only when most of its FP32 arithmetic flushes. The GELU
# kernels promise accurate tanhf (MUFU.EX2 + MUFU.RCP and FMAs instead of MUFU.TANH).
"$CUOBJDUMP" -sass "$SO" >"$TMP/sass.txt"
awk '/Function :/ { fn = $3; n++ }
     /MUFU\.TANH/ { tanh[fn]++ }
     / F(ADD|MUL|FMA)[ .]/ { arith[fn]++; if ($0 ~ / F(ADD|MUL|FMA)[A-Z0-9.]*\.FTZ/) ftz[fn]++ }
     /MUFU\./ { if (fn ~ /bias_gelu/) { match($0, /MUFU\.[A-Z0-9]+/); gelu[substr($0, RSTART, RLENGTH)]++ } }
     END {
       bad = 0
       for (f in tanh) { print "cuda_compile_check: FAILED, MUFU.TANH (fast-math tanh) in " f; bad = 1 }
       for (f in arith) if (arith[f] >= 8 && ftz[f] * 2 > arith[f]) {
         print "cuda_compile_check: FAILED, " ftz[f] " of " arith[f] " FADD/FMUL/FFMA flush to zero (fast math) in " f
         bad = 1 }
       s = ""; for (m in gelu) s = s " " m "x" gelu[m]
       printf "cuda_compile_check: math: %d kernels, %s; bias_gelu kernels use%s\n", n, \
              bad ? "FAST-MATH CODE FOUND" : "no MUFU.TANH, no flush-to-zero arithmetic", s
       exit bad }' "$TMP/sass.txt" || { echo "cuda_compile_check: FAILED, fast-math code in the sm_90 SASS (see above)" >&2; exit 1; }
grep -q "bias_gelu_fwd_kernel" "$TMP/sass.txt" || { echo "cuda_compile_check: FAILED, no bias_gelu SASS to check" >&2; exit 1; }
echo "cuda_compile_check: OK ($(basename "$SO"), sm_90, $(( $(date +%s) - start )) s)"

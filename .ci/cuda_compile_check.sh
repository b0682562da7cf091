#!/usr/bin/env bash
# Compile check of the CUDA sources (csrc/*.cu) on a CPU-only machine: builds gpt2_fast._C with a
# CUDA build of torch into a temp dir and checks that the .so carries sm_90 device code.
# Run by .ci/run after `make test`; users' `make test` does not need it.
#
#   CUDA_VENV    venv with the CUDA torch (default /work/.venv-cuda; created when missing, reused after)
#   CUDA_HOME    default /usr/local/cuda (nvcc 13.0, cudart; its cublas/cusparse headers come from the
#                venv's nvidia/cu13/include, which torch's headers need)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CUDA_VENV=${CUDA_VENV:-/work/.venv-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
TORCH_PIN=${TORCH_PIN:-2.14.1}
start=$(date +%s)

if ! "$CUDA_VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.__version__.startswith('$TORCH_PIN') else 1)" 2>/dev/null; then
  echo "cuda_compile_check: creating $CUDA_VENV (torch==$TORCH_PIN with CUDA)"
  python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q "torch==$TORCH_PIN" ninja pybind11 setuptools wheel numpy
fi
PY="$CUDA_VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
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
echo "cuda_compile_check: OK ($(basename "$SO"), sm_90, $(( $(date +%s) - start )) s)"

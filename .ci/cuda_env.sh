# Sourced (not run) by .ci/cuda_compile_check.sh and bench/gpu_check.sh: the toolkit paths that
# building gpt2_fast._C against a pip-installed CUDA torch needs.
#
#   cuda_env PY      exports CUDA_HOME, PATH, CPATH and LIBRARY_PATH for the torch of python PY:
#     CUDA_HOME      kept when set; else the toolkit folder nvcc reports itself (`nvcc --dryrun`
#                    prints TOP=<toolkit>/bin/..; nvcc on PATH may be a wrapper script outside the
#                    toolkit, so its own path says nothing), else /usr/local/cuda
#     CPATH          += <torch's site-packages>/nvidia/cu13/include (and cu12): the cuBLAS / cuSPARSE
#                    headers torch's headers include, absent from a toolkit folder without those
#                    libraries ("cusparse.h: No such file or directory")
#     LIBRARY_PATH   += $CUDA_HOME/lib64 and the wheel's nvidia/cu13/lib ("cannot find -lcudart")
#   cuda_env_report  one line per setting, for logs
cuda_toolkit_dir() {
    local nvcc top tmp
    nvcc=$(command -v nvcc 2>/dev/null || true)
    if [ -n "$nvcc" ]; then
        tmp=$(mktemp -d)
        : >"$tmp/x.cu"
        top=$(cd "$tmp" && timeout 30 "$nvcc" --dryrun -c x.cu -o x.o 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1) || true
        rm -rf "$tmp"
        if [ -n "$top" ] && [ -x "$top/bin/nvcc" ]; then (cd "$top" && pwd -P); return 0; fi
        top=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        if [ -x "$top/bin/nvcc" ] && [ -d "$top/include" ]; then echo "$top"; return 0; fi
    fi
    echo /usr/local/cuda
}

cuda_env() {
    local py=$1 site d
    export CUDA_HOME=${CUDA_HOME:-$(cuda_toolkit_dir)}
    export PATH="$CUDA_HOME/bin:$PATH"
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null || true)
    for d in "$site/nvidia/cu13/include" "$site/nvidia/cu12/include"; do
        [ -n "$site" ] && [ -d "$d" ] && export CPATH="$d${CPATH:+:$CPATH}"
    done
    for d in "$site/nvidia/cu13/lib" "$CUDA_HOME/lib64"; do  # prepended: lib64 ends up first
        [ -d "$d" ] && export LIBRARY_PATH="$d${LIBRARY_PATH:+:$LIBRARY_PATH}"
    done
    return 0
}

cuda_env_report() {
    echo "CUDA_HOME=$CUDA_HOME (nvcc: $(command -v nvcc || echo none); $( [ -x "$CUDA_HOME/bin/nvcc" ] && "$CUDA_HOME/bin/nvcc" --version | tail -1 || echo "no $CUDA_HOME/bin/nvcc"))"
    echo "CPATH=${CPATH:-}"
    echo "LIBRARY_PATH=${LIBRARY_PATH:-}"
}

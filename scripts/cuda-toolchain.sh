# Sourced by .ci/run and scripts/gpu-bundle.sh (bash): `cuda_toolchain WHO` installs (once, into
# a cache) or finds the pinned CUDA 13.0 compiler and NVRTC from PyPI, then exports NVCC, its
# LD_LIBRARY_PATH and MURA_CUDA_INCLUDE. Any failure is one line on stderr, `WHO: ...`, and a
# non-zero status (never a silent exit under `set -e`).
#
# Pinned exactly: unpinned, pip pulls a newer toolkit than the GPU machines' CUDA 13.0 driver
# accepts. The cache: MURA_CI_CACHE, else ~/.cache/mura-ci.
CUDA_PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
           nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)

cuda_toolchain() {
    local who="$1"
    local cache="${MURA_CI_CACHE:-}" env log nvcc
    if [ -z "$cache" ]; then
        [ -n "${HOME:-}" ] || { echo "$who: HOME is not set: set MURA_CI_CACHE to a folder for the CUDA compiler" >&2; return 1; }
        cache="$HOME/.cache/mura-ci"
    fi
    env="$cache/cuda-13.0.88-nvrtc"
    if [ ! -f "$env/.complete" ]; then
        command -v python3 >/dev/null || { echo "$who: python3 not found: it installs the CUDA compiler from PyPI" >&2; return 1; }
        echo "$who: installing the CUDA 13.0 compiler into $env"
        rm -rf "$env" && mkdir -p "$cache" || { echo "$who: cannot create $cache" >&2; return 1; }
        log="$(mktemp)"
        if python3 -m venv "$env" >"$log" 2>&1; then
            "$env/bin/pip" install --quiet --disable-pip-version-check "${CUDA_PKGS[@]}" >>"$log" 2>&1
        else  # no venv module (Debian without python3-venv): a plain target directory
            rm -rf "$env"
            python3 -m pip install --quiet --disable-pip-version-check --target "$env/site" \
                "${CUDA_PKGS[@]}" >>"$log" 2>&1
        fi || {
            echo "$who: pip could not install ${CUDA_PKGS[*]} into $env (no network or no pip?): $(tail -n1 "$log")" >&2
            rm -f "$log"; return 1
        }
        rm -f "$log"
        touch "$env/.complete"
    fi
    # nvcc by its real path: through a symlink it cannot find its own nvvm and headers.
    nvcc="$(find "$env" -path '*/nvidia/cu13/bin/nvcc' -type f -print -quit 2>/dev/null)"
    [ -n "$nvcc" ] || { echo "$who: no nvcc under $env (remove it to reinstall)" >&2; return 1; }
    NVCC="$(realpath "$nvcc")"
    "$NVCC" --version >/dev/null 2>&1 || { echo "$who: $NVCC does not run" >&2; return 1; }
    local cu13
    cu13="$(dirname "$(dirname "$NVCC")")"
    export NVCC
    export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export MURA_CUDA_INCLUDE="$cu13/include"
}

#!/usr/bin/env bash
# Builds the release binary, the GPU test binaries and the kernel harness here and gathers them in
# gpu-bundle/, packed as gpu-bundle.tar.xz (both git-ignored; the archive <= 60 MB), to copy onto a
# GPU machine that has the CUDA driver but no Rust toolchain:
#   scripts/gpu-bundle.sh && scp gpu-bundle.tar.xz host: && ssh host 'tar xJf gpu-bundle.tar.xz && gpu-bundle/gpu-check.sh'
# (with the device tool: carry gpu-bundle.tar.xz, run the same tar and gpu-check.sh there).
# The kernels must be precompiled (SASS for sm_80..sm_90 embedded): set NVCC or CUDA_HOME, or
# run .ci/run once, whose pinned CUDA 13.0 compiler (in ~/.cache/mura-ci) is found here. Built
# with NVRTC instead, every test process would compile them again on the GPU machine (minutes of
# a short session) and need its NVRTC and headers: refused unless MURA_BUNDLE_NVRTC=1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-bundle
TESTS=(device ops model) # the GPU test binaries of the mura package; and the kernel lab's `lab`

if [ -z "${NVCC:-}${CUDA_HOME:-}" ]; then
    found="$(find "${MURA_CI_CACHE:-$HOME/.cache/mura-ci}" -path '*/nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n1)"
    [ -n "$found" ] && export NVCC="$(realpath "$found")"
fi
cargo build --release
if target/release/mura info | grep -q "built with NVRTC" && [ "${MURA_BUNDLE_NVRTC:-0}" != 1 ]; then
    echo "gpu-bundle: no nvcc found, so the kernels are not precompiled: set NVCC (or run .ci/run" \
        "once), or MURA_BUNDLE_NVRTC=1 to bundle NVRTC kernels anyway" >&2
    exit 1
fi
args=()
for t in "${TESTS[@]}"; do args+=(--test "$t"); done
json="$(cargo test --release --no-run --message-format=json -p mura "${args[@]}")"
json+=$'\n'"$(cargo test --release --no-run --message-format=json -p mura-kernel-lab --test lab)"
# The kernel harness (tools/kernel-lab/benches/kernels.rs) as a plain binary.
json+=$'\n'"$(cargo bench --no-run --message-format=json -p mura-kernel-lab --bench kernels)"

rm -rf "$OUT"
mkdir -p "$OUT/tests"
cp target/release/mura "$OUT/mura"
echo "$json" | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        kind = msg["target"]["kind"]
        name = msg["target"]["name"]
        if "bench" in kind:
            shutil.copy(msg["executable"], sys.argv[1] + "/bench-" + name)
        elif "test" in kind:
            shutil.copy(msg["executable"], sys.argv[1] + "/tests/" + name)
' "$OUT"
# The emulator's ASan harness (build.rs), for the emulator self-tests that run there too.
asan="$(ls -t target/release/build/mura-*/out/emu-asan 2>/dev/null | head -n1)"
if [ -n "$asan" ]; then cp "$asan" "$OUT/emu-asan"; fi
cp scripts/gpu-check.sh scripts/pytorch_bench.py "$OUT/"
strip --strip-debug "$OUT/mura" "$OUT"/bench-* "$OUT"/tests/*
git rev-parse HEAD > "$OUT/COMMIT" 2>/dev/null || true

tar -cJf "$OUT.tar.xz" "$OUT"
ls -l "$OUT" "$OUT/tests"
size=$(du -sm "$OUT.tar.xz" | cut -f1)
echo "gpu-bundle: $(du -sm "$OUT" | cut -f1) MB in $OUT/, ${size} MB packed in $OUT.tar.xz"
[ "$size" -le 60 ] || { echo "gpu-bundle: $OUT.tar.xz over 60 MB" >&2; exit 1; }

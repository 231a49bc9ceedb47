#!/usr/bin/env bash
# Builds, on a dev machine with Rust and a network, what a GPU visit runs on a machine that has
# the CUDA driver but no Rust toolchain and no network (scripts/GPU-VISIT.md: the two calls):
#   gpu-bundle/bundle.tar.gz   (git-ignored; gzip, as the device image may lack xz; <= 48 MiB)
# holding the folder gpu-bundle/: the release `mura`, the GPU test binaries (tests/ops, model,
# device, lab), the kernel harness (bench-kernels), the emulator's ASan harness, the test
# fixtures, gpu-tests.txt, gpu-check.sh, gpu_kit.py, pytorch_bench.py and COMMIT.
#
# The kernels are compiled here by nvcc into fatbins (SASS sm_80..sm_90 and PTX compute_90, which
# the driver compiles for newer cards), so nothing is compiled on the GPU machine: NVCC or
# CUDA_HOME when set, else the pinned CUDA 13.0 compiler that .ci/run uses, installed from PyPI
# on first use (scripts/cuda-toolchain.sh). Artifact paths come from cargo's JSON messages
# (CARGO_TARGET_DIR is honoured). Any failure is one line, `gpu-bundle: ...`, and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
die() {
    echo "gpu-bundle: $*" >&2
    exit 1
}
trap 'echo "gpu-bundle: failed (status $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
LIMIT_MB=48 # the device tool carries 64 MiB in all, the working tree included
TESTS=(device ops model) # the mura package's GPU test binaries; the kernel lab's `lab` too

for t in cargo python3 tar gzip strip; do
    command -v "$t" >/dev/null || die "$t not found on PATH (the bundle needs cargo, python3, tar, gzip and strip)"
done
if [ -n "${NVCC:-}" ]; then
    [ -x "$NVCC" ] || die "NVCC=$NVCC is not an executable"
elif [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
else
    . scripts/cuda-toolchain.sh
    cuda_toolchain gpu-bundle || exit 1 # (it said why, in one line)
fi

target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')" ||
    die "cargo metadata failed"
stage="$target/gpu-bundle"
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
build() {
    "$@" --message-format=json-render-diagnostics >>"$json" || die "the build failed: $*"
}
args=()
for t in "${TESTS[@]}"; do args+=(--test "$t"); done
build cargo build --release -p mura --bin mura
build cargo test --release --no-run -p mura "${args[@]}"
build cargo test --release --no-run -p mura-kernel-lab --test lab
build cargo bench --no-run -p mura-kernel-lab --bench kernels

rm -rf "$stage"
mkdir -p "$stage/tests"
# Each executable by its target's name: mura, tests/<name>, bench-<name>; and the build script's
# ASan harness of the emulator (for the emulator self-test that runs it).
python3 - "$json" "$stage" <<'EOF' || die "could not collect the artifacts from cargo's messages"
import json, os, shutil, sys
path, stage = sys.argv[1:]
got = set()
for line in open(path):
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "build-script-executed":  # mura's alone makes an emu-asan
        asan = os.path.join(m["out_dir"], "emu-asan")
        if os.path.exists(asan):
            shutil.copy(asan, os.path.join(stage, "emu-asan"))
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"], m["target"]["name"]
    dest = {"bin": name, "test": f"tests/{name}", "bench": f"bench-{name}"}.get(kind[0])
    if dest is None:
        continue
    shutil.copy(m["executable"], os.path.join(stage, dest))
    got.add(dest)
want = {"mura", "bench-kernels", "tests/lab"} | {f"tests/{t}" for t in ("device", "ops", "model")}
if want - got:
    sys.exit(f"gpu-bundle: cargo reported no {', '.join(sorted(want - got))}")
EOF
info="$("$stage/mura" info)" || die "the built mura does not run here"
[[ "$info" == *"built with nvcc"* ]] ||
    die "mura was built without nvcc (its kernels would need NVRTC on the GPU machine): ${info##*$'\n'}"

# Every test gpu-tests.txt names exists in its binary (a renamed test would silently not run).
python3 - "$stage" tests/gpu-tests.txt <<'EOF' || die "tests/gpu-tests.txt names tests its binaries do not have"
import subprocess, sys
stage, listed = sys.argv[1:]
want = [l.split() for l in open(listed) if l.strip() and not l.startswith("#")]
have = {}
bad = []
for binary, test in want:
    if binary not in have:
        out = subprocess.run([f"{stage}/tests/{binary}", "--list", "--format", "terse"],
                             capture_output=True, text=True).stdout
        have[binary] = {l.rsplit(": ", 1)[0] for l in out.splitlines()}
    if test not in have[binary]:
        bad.append(f"{binary} {test}")
if bad:
    print("gpu-bundle: not in their binaries: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF

cp -r tests/fixtures "$stage/fixtures"
cp tests/gpu-tests.txt scripts/gpu-check.sh scripts/gpu_kit.py scripts/pytorch_bench.py "$stage/"
strip --strip-debug "$stage/mura" "$stage"/bench-* "$stage"/tests/*
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit-dirty"
echo "$commit" >"$stage/COMMIT"

mkdir -p gpu-bundle
rm -f gpu-bundle/bundle.tar.gz
tar -czf gpu-bundle/bundle.tar.gz -C "$target" gpu-bundle
size=$(du -m gpu-bundle/bundle.tar.gz | cut -f1)
echo "gpu-bundle: gpu-bundle/bundle.tar.gz, ${size} MiB ($(du -sm "$stage" | cut -f1) MiB unpacked), commit $commit"
[ "$size" -le "$LIMIT_MB" ] || die "gpu-bundle/bundle.tar.gz is ${size} MiB, over ${LIMIT_MB} MiB"

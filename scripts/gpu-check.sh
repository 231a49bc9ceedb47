#!/usr/bin/env bash
# Runs on a GPU machine, from inside the folder scripts/gpu-bundle.sh made: `mura info`, every GPU
# test on the real device (MURA_TEST_DEVICE=cuda: no GPU is a failure, not a skip), and a short
# `mura bench` when this build has one. Prints PASS or FAIL last; record the result in
# BENCHMARKS.md (card, date, pass/fail, figures).
set -uo pipefail
cd "$(dirname "$0")"
export MURA_BIN="$PWD/mura"
export MURA_TEST_DEVICE="${MURA_TEST_DEVICE:-cuda}"
[ -f emu-asan ] && export MURA_EMU_ASAN="$PWD/emu-asan"
fail=0

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(cat COMMIT 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
./mura info --kernels || fail=1

for t in tests/*; do
    echo "== $t (MURA_TEST_DEVICE=$MURA_TEST_DEVICE)"
    "$t" --test-threads=1 || fail=1
done

if ./mura bench --help 2>/dev/null | grep -q -- '--device'; then
    echo "== mura bench --device cuda"
    ./mura bench --device cuda || fail=1
else
    echo "== mura bench: not in this build"
fi

if [ "$fail" = 0 ]; then echo "gpu-check: PASS"; else echo "gpu-check: FAIL"; fi
exit "$fail"

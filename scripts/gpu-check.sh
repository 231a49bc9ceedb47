#!/usr/bin/env bash
# Runs on a GPU machine, from inside the folder scripts/gpu-bundle.sh made. Stages (default: all):
#   tests  `mura info` and every GPU test on the real device (MURA_TEST_DEVICE=cuda: no GPU is a
#          failure, not a skip)
#   bench  `mura bench` of DenseNet-169 at 224² (bf16 batch 64 with and without graphs, f32
#          batch 64, bf16 batch 256) and the per-kernel harness (bench-kernels) at batch 64
#   torch  scripts/pytorch_bench.py on the same card: eager fp32, AMP bf16 channels_last and
#          torch.compile at batch 64, then eager fp32 and AMP at batch 256 (fits or runs out)
# Each stage's output also goes to $OUT/<stage>.log when OUT is set (the device tool's folder).
# Prints PASS or FAIL last; record the figures in BENCHMARKS.md (card, date, baseline beside).
#   gpu-check.sh tests bench    # two stages
set -uo pipefail
cd "$(dirname "$0")"
export MURA_BIN="$PWD/mura"
export MURA_TEST_DEVICE="${MURA_TEST_DEVICE:-cuda}"
[ -f emu-asan ] && export MURA_EMU_ASAN="$PWD/emu-asan"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests bench torch)
LOGDIR="${OUT:-}"
fail=0

# Each stage returns non-zero when any of its steps failed (it may run in a pipe's subshell).
tests() {
    local rc=0
    ./mura info --kernels || rc=1
    for t in tests/*; do
        echo "== $t (MURA_TEST_DEVICE=$MURA_TEST_DEVICE)"
        "$t" --test-threads=1 || rc=1
    done
    return $rc
}

bench() {
    local rc=0
    local arch=(--arch densenet169 --image-size 224 --steps 10 --warmup 2)
    for run in "bf16 64" "bf16 64 --no-graphs" "f32 64" "bf16 256"; do
        set -- $run
        echo "== mura bench --device cuda --precision $1 --batch $2 ${3:-}"
        ./mura bench --device cuda "${arch[@]}" --precision "$1" --batch "$2" ${3:-} || rc=1
        ./mura bench --device cuda "${arch[@]}" --precision "$1" --batch "$2" ${3:-} --json || rc=1
    done
    echo "== bench-kernels densenet169 64 224 bf16 --device cuda"
    ./bench-kernels densenet169 64 224 bf16 --device cuda || rc=1
    return $rc
}

torch() {
    local rc=0
    local py="${PYTHON:-python3}"
    echo "== pytorch_bench.py batch 64 ($($py -c 'import torch; print(torch.__version__)'))"
    "$py" pytorch_bench.py --device cuda --batch 64 --size 224 --steps 10 --warmup 3 --markdown || rc=1
    echo "== pytorch_bench.py batch 256 (eager fp32, AMP)"
    "$py" pytorch_bench.py --device cuda --batch 256 --size 224 --steps 3 --warmup 1 \
        --modes eager-fp32,amp-bf16-channels-last --markdown || rc=1
    return $rc
}

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(cat COMMIT 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
for s in "${STAGES[@]}"; do
    case "$s" in
    tests | bench | torch) ;;
    *) echo "gpu-check: unknown stage '$s' (tests, bench, torch)" >&2; exit 2 ;;
    esac
    echo "=== stage $s"
    if [ -n "$LOGDIR" ]; then
        "$s" 2>&1 | tee "$LOGDIR/$s.log"
        [ "${PIPESTATUS[0]}" = 0 ] || fail=1
    else
        "$s" || fail=1
    fi
done

if [ "$fail" = 0 ]; then echo "gpu-check: PASS"; else echo "gpu-check: FAIL"; fi
exit "$fail"

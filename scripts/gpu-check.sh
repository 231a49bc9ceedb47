#!/usr/bin/env bash
# A GPU visit's stages, run from inside the folder scripts/gpu-bundle.sh packs (no Rust, no
# network needed): see scripts/GPU-VISIT.md for the two-call plan.
#
#   gpu-check.sh [--call LABEL] [--budget SECONDS] STAGE...
#
# Stages (each callable alone; groups: call1, call2):
#   info         nvidia-smi (name, driver, clocks, memory; never a setting) and mura info --kernels
#   tests        every GPU test binary with MURA_TEST_DEVICE=cuda, only the tests of
#                gpu-tests.txt (the ones that touch a GPU), one CUDA context per binary
#   memcheck, racecheck, initcheck, synccheck
#                compute-sanitizer with that tool over the kernel tests (tests/ops, small shapes)
#   bench64      mura bench DenseNet-169 224² bf16 batch 64 (graphs)
#   bench-rest   the same bf16 batch 64 --no-graphs, f32 batch 64, bf16 batch 256
#   torch64      pytorch_bench.py eager fp32 and AMP bf16 channels_last at batch 64
#   compile64    pytorch_bench.py torch.compile (of the AMP channels_last model) at batch 64
#   torch256     pytorch_bench.py eager fp32 and AMP at batch 256 (fits or runs out)
#   harness      the per-kernel harness, DenseNet-169 batch 64 224² bf16
#   ncu          Nsight Compute on the probe's kernels beside the emulator's counts of them
#   call1 = info tests memcheck bench64 torch64
#   call2 = compile64 racecheck initcheck synccheck bench-rest torch256 ncu harness
#   (in order of need: what the budget cannot fit is SKIPped from the end)
#
# Every process runs under `timeout -k 5 N`, N its step's limit and never past the budget
# (default 540 s, inside the device tool's 600-s call): a step that would start with too little
# left is SKIPped, so the script always ends with its summary. After each step one line:
# `PASS|FAIL|SKIP name (seconds): what it recorded`, and a failing step's last lines. A failing
# step does not stop the next. Into $OUT (the device tool's folder; ./out without it):
#   results.jsonl   the raw records, one JSON object a line (scripts/gpu_kit.py says which)
#   gpu-check.log   everything printed
#   logs.tar.gz     each step's own output (and ncu's CSVs), packed after every stage
# MURA_TEST_DEVICE=emu runs every stage on the CPU emulator instead (a rehearsal: the benchmark
# stages then at tiny shapes; compute-sanitizer, ncu and torch are whatever is on PATH, or a
# one-line FAIL). KIT_PYTHON: the python for the torch stages (default python3).
set -uo pipefail
cd "$(dirname "$0")" || exit 1
KIT="$PWD"

usage() {
    echo "usage: gpu-check.sh [--call LABEL] [--budget SECONDS] STAGE... (stages: see the script's head)" >&2
    exit 2
}
CALL=call BUDGET=540 STAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --call) [ $# -ge 2 ] || usage; CALL="$2"; shift 2 ;;
    --budget) [[ "${2:-}" =~ ^[0-9]+$ ]] || usage; BUDGET="$2"; shift 2 ;;
    call1) STAGES+=(info tests memcheck bench64 torch64); shift ;;
    call2) STAGES+=(compile64 racecheck initcheck synccheck bench-rest torch256 ncu harness); shift ;;
    info | tests | memcheck | racecheck | initcheck | synccheck | bench64 | bench-rest | torch64 | \
        compile64 | torch256 | harness | ncu) STAGES+=("$1"); shift ;;
    *) echo "gpu-check: unknown stage or option '$1'" >&2; usage ;;
    esac
done
[ ${#STAGES[@]} -gt 0 ] || usage
command -v python3 >/dev/null || { echo "gpu-check: python3 not found: it writes the records" >&2; exit 1; }
command -v timeout >/dev/null || { echo "gpu-check: timeout (coreutils) not found" >&2; exit 1; }

DEVICE="${MURA_TEST_DEVICE:-cuda}"
export MURA_TEST_DEVICE="$DEVICE" MURA_BIN="$KIT/mura" MURA_FIXTURES="$KIT/fixtures" PYTHONUNBUFFERED=1
[ -f "$KIT/emu-asan" ] && export MURA_EMU_ASAN="$KIT/emu-asan"
DEST="${OUT:-$KIT/out}"
mkdir -p "$DEST" || exit 1
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")" || exit 1
exec > >(tee -a "$DEST/gpu-check.log") 2>&1
TEE=$!
PY="${KIT_PYTHON:-python3}"
KIT_TOOL_PATH="${KIT_TOOL_PATH-${CUDA_HOME:+$CUDA_HOME/bin:}/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer}"

# The card, as every record names it.
query() { timeout 20 nvidia-smi --query-gpu="$1" --format=csv,noheader 2>/dev/null | head -n1; }
if [ "$DEVICE" = emu ]; then
    KIT_CARD=emu KIT_DRIVER=none
    NET=(--arch custom --growth-rate 8 --block-config 2,2,2 --num-init-features 16 --bn-size 2 --image-size 32)
    STEPS=(--steps 2 --warmup 1) B64=2 B256=4 SIZE=32
    HARNESS=(densenet121 1 32 bf16 --reps 1) TORCH_DEVICE=cpu THREADS="$(nproc)"
else
    KIT_CARD="$(query name)" KIT_DRIVER="$(query driver_version)"
    NET=(--arch densenet169 --image-size 224) STEPS=(--steps 10 --warmup 2) B64=64 B256=256 SIZE=224
    HARNESS=(densenet169 64 224 bf16) TORCH_DEVICE=cuda THREADS=1
fi
export KIT_CARD="${KIT_CARD:-unknown}" KIT_DRIVER="${KIT_DRIVER:-unknown}" KIT_CALL="$CALL"
export KIT_COMMIT="$(cat COMMIT 2>/dev/null || echo unknown)" KIT_RESULTS="$DEST/results.jsonl"
START=$SECONDS FAILED=() PASSED=0

# run_step NAME LIMIT CMD...: CMD under timeout (LIMIT, or what the budget leaves), its output
# into $STEP_LOG; sets STEP_RC and STEP_SECS. Returns 1 (and says SKIP) when too little is left.
run_step() {
    local name="$1" limit="$2" left t0
    shift 2
    left=$((BUDGET - (SECONDS - START) - 10))
    STEP_LOG="$LOGS/$name.log"
    if [ "$left" -lt 20 ]; then
        echo "SKIP $name (0 s): only $((left + 10)) s of the ${BUDGET}-s budget left"
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    local cmd="$*"
    [ ${#cmd} -le 160 ] || cmd="${cmd:0:150} ..."
    echo "-- $name: $cmd (at most $limit s)"
    t0="$(date +%s.%N)"
    timeout -k 5 "$limit" "$@" >"$STEP_LOG" 2>&1 </dev/null
    STEP_RC=$?
    STEP_SECS="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ] && echo "   (killed after $limit s)"
    return 0
}

# judge NAME GPU_KIT_ARGS...: records the step with scripts/gpu_kit.py, and says PASS or FAIL.
judge() {
    local name="$1" said rc
    shift
    said="$(python3 "$KIT/gpu_kit.py" "$@" 2>&1)"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name (${STEP_SECS:-0} s): $said"
        PASSED=$((PASSED + 1))
    else
        echo "FAIL $name (${STEP_SECS:-0} s): $said"
        [ -f "${STEP_LOG:-}" ] && tail -n 15 "$STEP_LOG" | sed 's/^/   | /'
        FAILED+=("$name")
    fi
}

# missing NAME KIND WHAT: a stage whose tool is not on this machine: one line, and a record.
missing() {
    local said="$LOGS/$1.missing"
    echo "$3" >"$said"
    STEP_SECS=0 STEP_LOG=""
    judge "$1" json "$2" "$said" "step=$1"
}

not_found() { echo "not found on PATH${KIT_TOOL_PATH:+ or in $KIT_TOOL_PATH}"; }

# The path of tool $1: on PATH, else in KIT_TOOL_PATH's folders or Nsight Compute's.
find_tool() {
    local p
    p="$(command -v "$1")" && { echo "$p"; return 0; }
    IFS=: read -ra dirs <<<"$KIT_TOOL_PATH"
    for p in "${dirs[@]/%//$1}" /opt/nvidia/nsight-compute/*/"$1"; do
        [ -n "$KIT_TOOL_PATH" ] || break
        [ -x "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

# The GPU tests of binary $1 (gpu-tests.txt).
gpu_tests() { awk -v b="$1" '$1 == b { print $2 }' gpu-tests.txt; }

stage_info() {
    if [ "$DEVICE" != emu ]; then
        if command -v nvidia-smi >/dev/null; then
            run_step nvidia-smi 60 bash -c 'nvidia-smi && nvidia-smi -q -d CLOCK,MEMORY,PERFORMANCE,POWER,ECC' &&
                judge nvidia-smi text info nvidia_smi "$STEP_LOG" "$STEP_RC"
        else
            missing nvidia-smi info "nvidia-smi not found on PATH"
        fi
    fi
    run_step mura-info 60 ./mura info --kernels && judge mura-info text info mura_info "$STEP_LOG" "$STEP_RC"
}

stage_tests() {
    local b limit
    for b in $(awk '!/^#/ && NF { print $1 }' gpu-tests.txt | uniq); do
        if [ ! -x "tests/$b" ]; then
            STEP_SECS=0 STEP_LOG=""
            echo "FAIL tests-$b (0 s): tests/$b is not in the bundle"
            FAILED+=("tests-$b")
            continue
        fi
        case "$b" in model) limit=180 ;; lab) limit=120 ;; *) limit=90 ;; esac
        run_step "tests-$b" "$limit" "tests/$b" --exact --test-threads="$THREADS" $(gpu_tests "$b") &&
            judge "tests-$b" tests "$b" "$STEP_LOG" "$STEP_SECS" "$STEP_RC"
    done
}

stage_sanitizer() {
    local tool="$1" cs
    cs="$(find_tool compute-sanitizer)" || { missing "$tool" sanitizer "compute-sanitizer $(not_found)"; return; }
    run_step "$tool" 150 "$cs" --tool "$tool" --error-exitcode 86 --print-limit 50 \
        tests/ops --exact --test-threads=1 $(gpu_tests ops) &&
        judge "$tool" sanitizer "$tool" ops "$STEP_LOG" "$STEP_SECS" "$STEP_RC"
}

# bench NAME PRECISION BATCH [--no-graphs]: one mura bench configuration, once.
bench() {
    run_step "$1" 150 ./mura bench --device "$DEVICE" "${NET[@]}" --precision "$2" --batch "$3" \
        "${STEPS[@]}" ${4:-} --json &&
        judge "$1" json mura-bench "$STEP_LOG" "step=$1" "status=$STEP_RC" "seconds=$STEP_SECS"
}

stage_bench64() { bench bench-bf16-b64 bf16 "$B64"; }
stage_bench-rest() {
    bench bench-bf16-b64-no-graphs bf16 "$B64" --no-graphs
    bench bench-f32-b64 f32 "$B64"
    bench bench-bf16-b256 bf16 "$B256"
}

# torch NAME LIMIT BATCH MODES STEPS WARMUP: pytorch_bench.py, each mode in its own process.
torch() {
    if ! timeout 60 "$PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
        missing "$1" pytorch-bench "$PY cannot import torch and torchvision"
        return
    fi
    run_step "$1" "$2" "$PY" pytorch_bench.py --device "$TORCH_DEVICE" --size "$SIZE" \
        --batch "$3" --modes "$4" --steps "$5" --warmup "$6" &&
        judge "$1" json pytorch-bench "$STEP_LOG" "step=$1" "status=$STEP_RC" "seconds=$STEP_SECS"
}

stage_torch64() { torch torch-b64 240 "$B64" eager-fp32,amp-bf16-channels-last 10 3; }
stage_compile64() { torch compile-b64 300 "$B64" compile 10 3; }
stage_torch256() { torch torch-b256 240 "$B256" eager-fp32,amp-bf16-channels-last 3 1; }

stage_harness() {
    run_step harness 240 ./bench-kernels "${HARNESS[@]}" --device "$DEVICE" --jsonl "$LOGS/harness.jsonl" &&
        judge harness json kernel "$LOGS/harness.jsonl" step=harness "status=$STEP_RC"
}

stage_ncu() {
    local ncu kernels pass emu="$LOGS/ncu-emu.log"
    ncu="$(find_tool ncu)" || { missing ncu ncu "ncu $(not_found)"; return; }
    run_step ncu-emu 180 ./bench-kernels --probe --device emu || return
    kernels="$(python3 gpu_kit.py ncu-kernels "$emu")" || {
        judge ncu-emu json ncu "$emu" "status=$STEP_RC"
        return
    }
    for pass in core extra; do
        # Each pass profiles the probe's kernels once; a metric unknown to this ncu fails only its
        # pass. --clock-control none: the card's clocks as they are.
        run_step "ncu-$pass" 240 "$ncu" --clock-control none --kernel-name "$kernels" \
            --metrics "$(python3 gpu_kit.py ncu-metrics "$pass")" --csv --page raw \
            --log-file "$LOGS/ncu-$pass.csv" ./bench-kernels --probe --device "$DEVICE" || return
        [ "$STEP_RC" -eq 0 ] || echo "   ncu-$pass exited with status $STEP_RC (see logs.tar.gz)"
    done
    judge ncu ncu "$emu" "$LOGS/ncu-core.csv" "$LOGS/ncu-extra.csv"
}

echo "== gpu-check: call $CALL, stages ${STAGES[*]}, $KIT_CARD (driver $KIT_DRIVER), device $DEVICE," \
    "commit $KIT_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget $BUDGET s"
for s in "${STAGES[@]}"; do
    echo "=== stage $s ($((SECONDS - START)) s in)"
    case "$s" in
    memcheck | racecheck | initcheck | synccheck) stage_sanitizer "$s" ;;
    *) "stage_$s" ;;
    esac
    tar -czf "$DEST/logs.tar.gz" -C "$LOGS" . 2>/dev/null
done
timeout 30 python3 gpu_kit.py summary "$KIT_RESULTS" "$CALL"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu-check: PASS ($PASSED steps in $((SECONDS - START)) s)"
else
    echo "gpu-check: FAIL (${#FAILED[@]} of $((PASSED + ${#FAILED[@]})) steps: ${FAILED[*]}; $((SECONDS - START)) s)"
fi
rm -rf "$LOGS"
status=$(( ${#FAILED[@]} > 0 ))
exec >&- 2>&-
wait "$TEE" 2>/dev/null # every line in the log and on the terminal before the call returns
exit "$status"

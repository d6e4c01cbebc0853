#!/usr/bin/env bash
# Builds and runs the standalone check of the fused step's CUDA kernels (no TensorFlow needed):
# lo_tf/kernels/mlp_lopt_cuda_harness.cu runs CudaForward and CudaBackward of mlp_lopt_cuda.cu on
# 1, 31, 1,000, 19,722 (the paper's CNN, 8 tensors) and 10^7 weights, compares every output with
# the CPU units run on the same inputs, times both (CUDA events, median of 25 runs after 3 warm-up
# runs) and a device-to-device copy, and writes JSON.
#
#   bash third_party/tf_custom_op/gpu_check.sh [out.json]
#
# out.json: default $OUT/gpu_check.json when $OUT is set, else build/gpu_check/gpu_check.json; the
# build log and the harness's printout go beside it (<out>.log). With nvcc (PATH, $CUDA_HOME/bin,
# $CUDA_PATH/bin, /usr/local/cuda/bin) and a GPU (nvidia-smi lists one) it compiles the CUDA kernels
# with nvcc for that GPU (the op library's nvcc flags) and runs them. Otherwise it says so in one
# line and runs the CPU parts: the same harness compiled by c++ alone, the CUDA kernels on emulated
# threads (cuda_emulation.h; 10^7 weights skipped, timings not GPU numbers). Extra harness flags:
# $HARNESS_FLAGS (e.g. "--runs 50"). About a minute on a GPU machine; the build and the run are
# each under a timeout (150 s, 120 s) so that the whole stays under 5 minutes.
#
# Exit status: the harness's (0: every output agrees, 1: some output disagrees, 2: an error), or 2
# when a build fails or the run times out (the JSON then says why).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KERNELS=$REPO/lo_tf/kernels
if [ $# -ge 1 ]; then
  JSON=$1
elif [ -n "${OUT:-}" ]; then
  JSON=$OUT/gpu_check.json
else
  JSON=$REPO/build/gpu_check/gpu_check.json
fi
mkdir -p "$(dirname "$JSON")" || exit 2
JSON=$(cd "$(dirname "$JSON")" && pwd)/$(basename "$JSON")
LOG=${JSON%.json}.log
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/lo_tf_gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$BUILD"' EXIT
CXX=${CXX:-c++}
: > "$LOG"

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

json_escape() { printf '%s' "$1" | tr '\n\t' '  ' | sed 's/\\/\\\\/g; s/"/\\"/g'; }

# A JSON file saying why there are no results (the harness writes the real one).
fail() {
  printf '{"mode": "%s", "ok": false, "complete": false, "error": "%s", "log": "%s"}\n' \
    "$1" "$(json_escape "$2")" "$(json_escape "$LOG")" > "$JSON"
  say "FAILED: $2 (see $LOG)"
  exit 2
}

# Runs a build command under a timeout, its output into the log; fail() with its first error line.
build() {
  local mode=$1
  shift
  echo "+ $*" >> "$LOG"
  if ! timeout 150 "$@" >> "$BUILD/out" 2>&1; then
    cat "$BUILD/out" >> "$LOG"
    fail "$mode" "build failed: $(grep -m1 -i 'error' "$BUILD/out" || tail -n1 "$BUILD/out")"
  fi
  cat "$BUILD/out" >> "$LOG"
  : > "$BUILD/out"
}

find_nvcc() {
  command -v nvcc && return
  local home
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then
      echo "$home/bin/nvcc"
      return
    fi
  done
}

NVCC=$(find_nvcc)
GPUS=0
if command -v nvidia-smi > /dev/null; then
  GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ')
fi
command -v "$CXX" > /dev/null || fail none "no C++ compiler ($CXX)"

# The CPU units as the op library's generic variant is built (build_kernels.py's CPU_FLAGS).
CPU_FLAGS=(-O3 -std=c++17 -fopenmp-simd -ffp-contract=fast -fno-math-errno -DLO_TF_ISA=generic)

# Adds why the run is incomplete to the harness's own JSON (one line), or writes one via fail().
mark() {
  if [ -s "$JSON" ] && grep -q '^{"mode"' "$JSON"; then
    local body
    body=$(cat "$JSON")
    printf '{"error": "%s", %s\n' "$(json_escape "$2")" "${body#\{}" > "$JSON"
    say "FAILED: $2 (see $LOG)"
    exit 2
  fi
  fail "$1" "$2"
}

run_emulated() {  # $1: why there are no GPU numbers
  MODE=emulated
  say "$1: running the CPU parts only (CUDA kernels on emulated threads; no GPU numbers)"
  NOTE="gpu_check.sh: $1; c++ build, CUDA kernels on emulated threads"
  build emulated "$CXX" "${CPU_FLAGS[@]}" -c "$KERNELS/mlp_lopt_cpu.cc" -o "$BUILD/cpu.o"
  build emulated "$CXX" -std=c++17 -O2 -pthread -x c++ "$KERNELS/mlp_lopt_cuda_harness.cu" -x none \
    "$BUILD/cpu.o" -o "$BUILD/harness_emulated"
  run "$BUILD/harness_emulated" --runs 2 --warmup 0  # host-clock timings of the emulation mean nothing
}

run() {  # the harness and its flags; sets RC
  # shellcheck disable=SC2086  # HARNESS_FLAGS is a list of words
  timeout 120 "$@" --json "$JSON" --note "$NOTE" ${HARNESS_FLAGS:-} 2>&1 | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
}

if [ -z "$NVCC" ]; then
  run_emulated "no nvcc"
elif [ "$GPUS" -eq 0 ]; then
  run_emulated "no GPU (nvidia-smi lists none)"
else
  MODE=gpu
  # The first GPU's architecture when this nvcc knows it, else the op library's (build_kernels.py's
  # CUDA_ARCH_FLAGS: sm_80, sm_90 and compute_90 PTX, which later GPUs compile at load).
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n1 | tr -d ' .')
  if [[ "$CAP" =~ ^[0-9]+$ ]] && "$NVCC" --list-gpu-code 2> /dev/null | grep -qx "sm_$CAP"; then
    ARCH=("-gencode=arch=compute_$CAP,code=[sm_$CAP,compute_$CAP]")
  else
    ARCH=(-gencode=arch=compute_80,code=sm_80 "-gencode=arch=compute_90,code=[sm_90,compute_90]")
  fi
  GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | head -n1)
  say "$GPUS GPU(s) ($GPU); $("$NVCC" --version | tail -n1); building for ${ARCH[*]}"
  NOTE="gpu_check.sh: nvcc ${ARCH[*]}; $GPU"
  build gpu "$CXX" "${CPU_FLAGS[@]}" -c "$KERNELS/mlp_lopt_cpu.cc" -o "$BUILD/cpu.o"
  build gpu "$NVCC" -O3 -std=c++17 "${ARCH[@]}" "$KERNELS/mlp_lopt_cuda_harness.cu" "$BUILD/cpu.o" \
    -o "$BUILD/harness"
  run "$BUILD/harness"
  if [ "$RC" -eq 3 ]; then  # e.g. a driver older than this nvcc's CUDA
    run_emulated "no usable CUDA device ($(tail -n1 "$LOG"))"
  fi
fi

case $RC in
  0 | 1) ;;
  124) mark "$MODE" "the harness ran past 120 s; the shapes it finished are here" ;;
  *) mark "$MODE" "the harness failed (status $RC): $(tail -n1 "$LOG")" ;;
esac
say "results in $JSON (mode $MODE, status $RC)"
exit "$RC"

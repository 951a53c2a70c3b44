#!/usr/bin/env bash
# The checks that need an NVIDIA GPU (an H100 is the reference), for a
# machine with the CUDA toolkit (nvcc, cudart, cuBLAS; compute-sanitizer
# for step 3) and a driver. CI has no GPU: tools/check.sh only compiles the
# CUDA sources and runs the CPU fallback. This script:
#   1. builds build/gpu with -Dcuda=enabled -Ddaemon=disabled (the engine,
#      kernels, tools and tests; no daemon libraries needed: meson, ninja,
#      gcc, cmocka, jansson and pcre2 are);
#   2. runs tests/test-cuda with MOED_REQUIRE_GPU=1: every CUDA op against
#      the F32 reference and the CPU backend on awkward sizes, within the
#      tolerances stated at the top of tests/test-cuda.c, and the weight
#      upload; a case cannot pass by skipping;
#   3. runs it again under compute-sanitizer --tool memcheck (out-of-bounds
#      and misaligned device accesses, device memory leaks; fails on any
#      error), and, with MOED_GPU_RACECHECK=1, --tool racecheck (shared
#      memory hazards of the attention kernel; slow);
#   4. runs the whole-model comparison (logits of the fixture models on the
#      CUDA backend against the CPU reference, greedy text) once
#      tests/test-forward.c honours MOED_FORWARD_BACKEND=cuda; until then it
#      says so and, with MOED_REQUIRE_WHOLE_MODEL=1, fails;
#   5. prints the micro-benchmarks (MOED_CUDA_BENCH=1: device copy
#      bandwidth, matmul bandwidth per type and batch, MLA decode at batch 64
#      x 4096 tokens) into build/gpu/bench-<date>-<device>.txt.
# Run from anywhere: tools/gpu-check.sh. MOED_GPU_BUILD overrides the build
# directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH

build=${MOED_GPU_BUILD:-build/gpu}
mkdir -p "$(dirname "$build")"

echo "== devices"
nvidia-smi -L || { echo "gpu-check: nvidia-smi finds no GPU"; exit 1; }

echo "== build ($build: CUDA enabled, no daemon)"
if [ -f "$build/build.ninja" ]; then
  meson setup --reconfigure "$build" -Dcuda=enabled -Ddaemon=disabled --buildtype=debugoptimized >/dev/null
else
  meson setup "$build" -Dcuda=enabled -Ddaemon=disabled --buildtype=debugoptimized >/dev/null
fi
ninja -C "$build" tests/test-cuda tests/test-forward

echo "== test-cuda on the device"
MOED_REQUIRE_GPU=1 "$build/tests/test-cuda"

echo "== test-cuda under compute-sanitizer memcheck"
compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 \
  env MOED_REQUIRE_GPU=1 "$build/tests/test-cuda"
if [ "${MOED_GPU_RACECHECK:-0}" = 1 ]; then
  echo "== test-cuda under compute-sanitizer racecheck"
  compute-sanitizer --tool racecheck --error-exitcode 1 \
    env MOED_REQUIRE_GPU=1 "$build/tests/test-cuda"
fi

echo "== whole model: CUDA against the CPU reference"
if grep -q MOED_FORWARD_BACKEND tests/test-forward.c; then
  MOED_FORWARD_BACKEND=cuda MOED_REQUIRE_GPU=1 \
    meson test -C "$build" forward --print-errorlogs --timeout-multiplier 2
else
  echo "whole-model comparison: not wired yet (tests/test-forward.c has no MOED_FORWARD_BACKEND)"
  if [ "${MOED_REQUIRE_WHOLE_MODEL:-0}" = 1 ]; then
    exit 1
  fi
fi

echo "== micro-benchmarks"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' /' '--')
out="$build/bench-$(date +%Y-%m-%d)-$device.txt"
MOED_CUDA_BENCH=1 "$build/tests/test-cuda" | tee "$out"
echo "gpu-check: all green (benchmarks in $out)"

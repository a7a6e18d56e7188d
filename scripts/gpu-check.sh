#!/usr/bin/env bash
# The GPU check of issue 12, for a machine with an NVIDIA GPU and no Rust toolchain (the H200 the
# `device` tool lends). Two steps:
#   1. here (cargo):  scripts/gpu-check.sh build
#      builds `phalanx` with --features cuda and the nvrtc_compile and gpu_parity test binaries,
#      strips them into gpu-bin/ (git-ignored): name `gpu-bin` in the device call's `carry` list.
#   2. there:         scripts/gpu-check.sh
#      with /usr/local/cuda (lib64, include, include/cccl): compiles every kernel to a cubin with the
#      machine's own NVRTC (fails on a spill), probes the GPU through `phalanx train --device cuda`,
#      runs gpu_parity (every kernel launched and compared with its CPU reference on fresh random
#      inputs, with timings; its own table is printed above) and prints a summary table last.
#      Written and compile-checked without a GPU: the parity run has not been tried on one yet.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=gpu-bin
if [ "${1:-}" = build ]; then
  set -e
  mkdir -p "$BIN"
  cargo build --release --features cuda
  strip -o "$BIN/phalanx" target/release/phalanx
  for t in nvrtc_compile gpu_parity; do
    exe=$(cargo test --release -p kernels --features cuda --test "$t" --no-run \
            --message-format=json | grep -o "\"executable\":\"[^\"]*/$t-[^\"]*\"" | cut -d'"' -f4)
    strip -o "$BIN/$t" "$exe"
  done
  ls -l "$BIN"
  exit 0
fi
CUDA=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PHALANX_CUDA_INCLUDE="$CUDA/include:$CUDA/include/cccl"
rows=()
row() { rows+=("| $1 | $2 | $3 |"); }
for f in phalanx nvrtc_compile gpu_parity; do
  [ -x "$BIN/$f" ] || { echo "missing $BIN/$f: run 'scripts/gpu-check.sh build' on the build machine and carry $BIN"; exit 2; }
done
gpu=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1); rc=$?
row "nvidia-smi" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(echo "$gpu" | head -1)"

echo "== NVRTC: every kernel to an sm_90 cubin"
out=$("$BIN/nvrtc_compile" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
summary=$(echo "$out" | grep -E "kernels in .* sources|SKIPPED" | head -1)
row "nvrtc compile, no spills" "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" "${summary:-exit $rc}"

echo "== phalanx train --device cuda (the probe)"
out=$("$BIN/phalanx" train --device cuda --steps 1 --no-checkpoint --out /tmp/gpu-check-run 2>&1); rc=$?
echo "$out"
# expected until the CUDA training path exists: exit 1, the device found and "not built yet"
found=$(echo "$out" | grep -o "found cuda:[^,]*([^)]*)" | head -1)
row "probe (--device cuda)" "$([ $rc = 1 ] && [ -n "$found" ] && echo ok || echo FAIL)" "${found:-$(echo "$out" | tail -1)}"

echo "== GPU parity: every kernel against its CPU reference (timings informative)"
out=$(timeout 240 "$BIN/gpu_parity" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
summary=$(echo "$out" | grep -E "^GPU parity: |SKIPPED" | head -1)
seed=$(echo "$out" | grep -o "PHALANX_PARITY_SEED=[0-9]*" | head -1)
fails=$(echo "$out" | grep -E "^\| .* \| FAIL \|$" | cut -d'|' -f2,4 | head -5 | tr '|\n' '/;')
row "gpu parity (20 kernels)" "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" \
  "${summary:-exit $rc}${seed:+, $seed}${fails:+; failed: $fails}"

echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"

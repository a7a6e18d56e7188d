#!/usr/bin/env bash
# The GPU check of issue 12, for a machine with an NVIDIA GPU and no Rust toolchain (the H200 the
# `device` tool lends). Two steps:
#   1. here (cargo):  scripts/gpu-check.sh build
#      builds `phalanx` with --features cuda and the nvrtc_compile, gpu_parity, gpu_model and gpu_stage test
#      binaries, strips them into gpu-bin/ (git-ignored): name `gpu-bin` in the device call's
#      `carry` list.
#   2. there:         scripts/gpu-check.sh
#      with /usr/local/cuda (lib64, include, include/cccl): compiles every kernel to a cubin with the
#      machine's own NVRTC (fails on a spill); gpu_parity (every kernel against its CPU reference);
#      gpu_model (the CUDA backend against the CPU backend: cuBLAS GEMMs, layouts, MoE, the micro
#      and tiny step's loss and every gradient within 1e-5, two runs with the same bits, each
#      weight's BF16 rounding or FP8 quantisation reused within a step with the bits of none); gpu_stage
#      (two pipeline stages on the GPU, deferred W, against the CPU's stages and the GPU's whole
#      step within 1e-5; again with --ep 2 expert groups on the GPU); a
#      300-step tiny run on the GPU and on the CPU (eval loss within 1%); the formation on the GPU
#      (tiny, 30 steps, DualPipe over 2 ranks against the single-process device run: final loss
#      within 1e-5, and whether the bits agree; again with --ep 2, the expert groups on the
#      copies' GPUs); `bench train --device
#      cuda` on small at 8×128 and 32×1024 without MTP (BF16, as PyTorch's autocast) beside its
#      figures on the same GPU
#      (10,369 and 233,646 tokens/s, ../shared/reference/gpu-h200.md), medium in BF16,
#      FP8 on small (and on medium when cuBLASLt's tensor cores run it), with the f32 and BF16
#      GEMM ceilings (medium's host-side init of 3.7B parameters takes a while); small 32×1024 and
#      the medium benches also profile one more step (`--profile`: a row with the largest regions
#      of the step, the whole table in the log). Prints
#      a summary table last, and writes each row to $OUT/gpu-check-table.md as it is made (the
#      device tool returns $OUT even from a call that runs past its limit). Budget: about 5
#      minutes; past BUDGET_S (480 s) the medium benches are skipped with a row saying so.
#      Written and compile-checked without a GPU: none of it has run on one yet.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=gpu-bin
if [ "${1:-}" = build ]; then
  set -e
  mkdir -p "$BIN"
  cargo build --release --features cuda
  strip -o "$BIN/phalanx" target/release/phalanx
  for t in nvrtc_compile gpu_parity gpu_model gpu_stage; do
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
# each row is also appended to $OUT/gpu-check-table.md as it is made (the device tool returns
# $OUT even when the call runs past its limit), and the heavy steps are skipped past BUDGET_S
TABLE=${OUT:+$OUT/gpu-check-table.md}
[ -n "$TABLE" ] && printf '| check | result | detail |\n|---|---|---|\n' > "$TABLE"
row() {
  rows+=("| $1 | $2 | $3 |")
  [ -n "$TABLE" ] && echo "| $1 | $2 | $3 |" >> "$TABLE"
  return 0
}
BUDGET_S=${BUDGET_S:-480}
over_budget() {  # name -> true (and a "skipped" row) once the check has run BUDGET_S seconds
  if [ "$SECONDS" -ge "$BUDGET_S" ]; then
    row "$1" "skipped" "the check had run ${SECONDS} s (budget ${BUDGET_S} s)"
    return 0
  fi
  return 1
}
for f in phalanx nvrtc_compile gpu_parity gpu_model; do
  [ -x "$BIN/$f" ] || { echo "missing $BIN/$f: run 'scripts/gpu-check.sh build' on the build machine and carry $BIN"; exit 2; }
done
gpu=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1); rc=$?
row "nvidia-smi" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(echo "$gpu" | head -1)"

echo "== probe: one tiny step through every fast path (cuBLASLt FP8, grouped expert GEMMs, FP8 experts in one launch, device router)"
# a fast path that faults poisons its CUDA context; if the probe fails, everything below runs with
# the fast paths off (the reference paths), so the rest of the check still measures something
probe=$(timeout 120 "$BIN/phalanx" bench train --device cuda --config configs/tiny.toml --steps 1 --precision fp8 2>&1); rc=$?
echo "$probe"
if [ $rc = 0 ]; then
  row "probe: fast paths (fp8 tensor cores, grouped gemms, fp8 experts in one launch, device router)" ok "$(echo "$probe" | grep -m1 "tokens/s" | cut -c1-300)"
else
  export PHALANX_FP8_GEMM=own PHALANX_GROUPED_GEMM=off PHALANX_FP8_GROUPED=off PHALANX_DEVICE_ROUTER=off
  row "probe: fast paths (fp8 tensor cores, grouped gemms, fp8 experts in one launch, device router)" FAIL \
    "exit $rc: $(echo "$probe" | tail -1 | cut -c1-200); the rest runs with PHALANX_FP8_GEMM=own PHALANX_GROUPED_GEMM=off PHALANX_FP8_GROUPED=off PHALANX_DEVICE_ROUTER=off"
fi

echo "== NVRTC: every kernel to an sm_90 cubin"
out=$("$BIN/nvrtc_compile" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
summary=$(echo "$out" | grep -E "kernels in .* sources|SKIPPED" | head -1)
row "nvrtc compile, no spills" "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" "${summary:-exit $rc}"

echo "== GPU parity: every kernel against its CPU reference (timings informative)"
out=$(timeout 240 "$BIN/gpu_parity" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
summary=$(echo "$out" | grep -E "^GPU parity: |SKIPPED" | head -1)
seed=$(echo "$out" | grep -o "PHALANX_PARITY_SEED=[0-9]*" | head -1)
fails=$(echo "$out" | grep -E "^\| .* \| FAIL \|$" | cut -d'|' -f2,4 | head -5 | tr '|\n' '/;')
row "gpu parity (every kernel)" "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" \
  "${summary:-exit $rc}${seed:+, $seed}${fails:+; failed: $fails}"

echo "== gpu_model: the CUDA backend against the CPU backend"
out=$(timeout 180 "$BIN/gpu_model" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
worst=$(echo "$out" | grep -E "^\| backward \(every gradient\)" | cut -d'|' -f3,6 | tr '\n' ';')
det=$(echo "$out" | grep -o "GPU determinism: [0-9a-f]\{12\}" | head -1)
fails=$(echo "$out" | grep -E "^\| .* \| FAIL \|$" | cut -d'|' -f2,3,4 | head -5 | tr '|\n' '/;')
dev=$(echo "$out" | grep -m1 "^device " | cut -c8-)
row "backend as opened (fp8 engine, expert gemms)" "$([ -n "$dev" ] && echo info || echo FAIL)" "${dev:-no device line}"
speed=$(echo "$out" | grep -E "^\| fp8 experts speed" | cut -d'|' -f3,5 | head -1)
row "fp8 experts, one launch vs the expert loop (medium's shape)" "$([ -n "$speed" ] && echo info || echo "not run")" "${speed:-the one-launch path is off (see the row above)}"
reuse=$(echo "$out" | grep -E "^tiny, fp8 (true|false), reuse true: " | cut -d' ' -f3,6-10 | tr '\n' ';')
row "weights prepared once per step (tiny, bf16 and fp8; same bits as every use)" \
  "$(echo "$out" | grep -q "weight_reuse_keeps_the_gpu_bits ... ok" && echo ok || echo FAIL)" "${reuse:-no reuse line}"
row "gpu model (primitives, micro+tiny step, determinism)" \
  "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" \
  "${worst:-exit $rc}${det:+; $det}${fails:+; failed: $fails}"

echo "== gpu_stage: pipeline stages on the GPU against the CPU's stages and the GPU's whole step"
out=$(timeout 90 "$BIN/gpu_stage" --nocapture --test-threads 1 2>&1); rc=$?
echo "$out"
vals=$(echo "$out" | grep -E "^\| staged" | cut -d'|' -f2,5 | tr '|\n' ':;')
row "gpu stages (2 stages, deferred W; --ep 2 groups on the gpu) vs cpu stages and the gpu step" \
  "$([ $rc = 0 ] && ! echo "$out" | grep -q SKIPPED && echo ok || echo FAIL)" "${vals:-exit $rc}"

echo "== tiny, 300 steps: --device cuda and --device cpu"
tiny() {  # device -> prints the eval loss, the sha and tokens/s of the run's summary
  timeout 150 "$BIN/phalanx" train --config configs/tiny.toml --steps 300 --device "$1" \
    --no-checkpoint --out "/tmp/gpu-check-tiny-$1" --summary-json "/tmp/gpu-check-tiny-$1.json" >/dev/null 2>"/tmp/gpu-check-tiny-$1.log"
  local rc=$?
  tail -3 "/tmp/gpu-check-tiny-$1.log"
  python3 -c "import json,sys; s=json.load(open('/tmp/gpu-check-tiny-$1.json')); print(s['eval_loss'], s['params_sha256'][:12], round(s['tokens_per_s']))" 2>/dev/null || echo "nan - 0 (exit $rc)"
}
read -r ev_gpu sha_gpu tps_gpu < <(tiny cuda | tail -1)
read -r ev_cpu sha_cpu tps_cpu < <(tiny cpu | tail -1)
ok=$(python3 -c "print('ok' if abs($ev_gpu-$ev_cpu) <= 0.01*abs($ev_cpu) else 'FAIL')" 2>/dev/null || echo FAIL)
row "tiny 300 steps: eval loss gpu vs cpu (≤ 1%)" "$ok" "gpu $ev_gpu ($tps_gpu tok/s, $sha_gpu) vs cpu $ev_cpu ($tps_cpu tok/s)"

echo "== the formation on the GPU: tiny, 30 steps, dualpipe --pp 2 vs the single-process device run"
form() {  # name extra... -> prints the final loss and the sha of the run's summary
  local name=$1; shift
  RUST_LOG=${RUST_LOG:-info} timeout 120 "$BIN/phalanx" train --config configs/tiny.toml --steps 30 --device cuda --microbatches 4 \
    --no-checkpoint --out "/tmp/gpu-check-form-$name" --summary-json "/tmp/gpu-check-form-$name.json" "$@" \
    >/dev/null 2>"/tmp/gpu-check-form-$name.log"
  local rc=$?
  tail -2 "/tmp/gpu-check-form-$name.log"
  python3 -c "import json; s=json.load(open('/tmp/gpu-check-form-$name.json')); print(s['final_loss'], s['params_sha256'][:12])" 2>/dev/null || echo "nan exit-$rc"
}
read -r l_one sha_one < <(form one | tail -1)
read -r l_pipe sha_pipe < <(form pipe --pp 2 --schedule dualpipe | tail -1)
ok=$(python3 -c "print('ok' if abs($l_pipe-$l_one) <= 1e-5*abs($l_one) else 'FAIL')" 2>/dev/null || echo FAIL)
row "formation on the gpu: dualpipe pp 2 vs one process (loss ≤ 1e-5)" "$ok" \
  "pipe $l_pipe ($sha_pipe) vs one $l_one ($sha_one); same bits: $([ "$sha_pipe" = "$sha_one" ] && [ "${sha_one#exit}" = "$sha_one" ] && echo yes || echo no)"
# expert groups on the copies' GPUs: the routed experts' rows cross the host to them and back
read -r l_ep sha_ep < <(form ep --pp 2 --ep 2 --schedule dualpipe | tail -1)
ok=$(python3 -c "print('ok' if abs($l_ep-$l_one) <= 1e-5*abs($l_one) else 'FAIL')" 2>/dev/null || echo FAIL)
row "formation on the gpu with --ep 2 vs one process (loss ≤ 1e-5)" "$ok" \
  "ep $l_ep ($sha_ep) vs one $l_one ($sha_one); groups opened: $(grep -c "expert group computes on" /tmp/gpu-check-form-ep.log)"

echo "== bench train --device cuda"
bench() {  # config batch seq steps extra... -> prints its lines, then "tokens/s tflops share%"
  local out
  out=$(timeout 150 "$BIN/phalanx" bench train --device cuda --config "$1" --batch-size "$2" --seq-len "$3" --steps "$4" "${@:5}" 2>&1)
  echo "$out" >&2
  echo "$out" > /tmp/gpu-check-bench-last.log
  echo "$out" | grep -o '[0-9]* tokens/s, [0-9.]* ms/step, [0-9.]* model TFLOP/s = [0-9.]*%' | head -1 \
    | awk '{print $1, $5, $9}'
}
# `--profile`: one more step after the timed ones, its regions timed between synchronisations;
# the row names the largest regions (the whole table is in the log above)
profile_row() {  # name
  local top
  top=$(python3 -c '
import json, sys
for line in open("/tmp/gpu-check-bench-last.log"):
    if line.startswith("{") and "\"profile\"" in line:
        p = json.loads(line)["profile"]
        print(p["top"], "(profiled step %.0f ms)" % p["step_ms"])
        break' 2>/dev/null)
  row "where a step goes: $1" "$([ -n "$top" ] && echo info || echo FAIL)" "${top:-no profile}"
}
# PyTorch's figures are BF16 autocast (f32 master weights): the BF16 rows are the comparison
read -r t8 f8 p8 < <(bench configs/small.toml 8 128 10 --no-mtp --precision bf16)
row "small 8×128 bf16, no MTP vs PyTorch 10,369 tok/s" "$([ -n "$t8" ] && echo measured || echo FAIL)" \
  "${t8:-?} tok/s = $(python3 -c "print(f'{${t8:-0}/10369:.2f}')")× PyTorch; ${f8:-?} TFLOP/s = ${p8:-?} of the bf16 GEMM ceiling"
read -r t32 f32 p32 < <(bench configs/small.toml 32 1024 5 --no-mtp --precision bf16 --profile)
row "small 32×1024 bf16, no MTP vs PyTorch 233,646 tok/s (goal ≥ 2×)" "$([ -n "$t32" ] && echo measured || echo FAIL)" \
  "${t32:-?} tok/s = $(python3 -c "print(f'{${t32:-0}/233646:.2f}')")× PyTorch; ${f32:-?} TFLOP/s = ${p32:-?} of the bf16 GEMM ceiling"
profile_row "small 32×1024 bf16"
read -r s32 sf32 sp32 < <(bench configs/small.toml 32 1024 5 --no-mtp)
row "small 32×1024 f32, no MTP" "$([ -n "$s32" ] && echo measured || echo FAIL)" \
  "${s32:-?} tok/s; ${sf32:-?} TFLOP/s = ${sp32:-?} of the f32 SGEMM ceiling"
if ! over_budget "medium 8×1024 bf16 (goal ≥ 35% of the BF16 GEMM ceiling)"; then
read -r tm fm pm < <(bench configs/medium.toml 8 1024 2 --precision bf16 --profile)
row "medium 8×1024 bf16 (goal ≥ 35% of the BF16 GEMM ceiling)" "$([ -n "$tm" ] && echo measured || echo FAIL)" \
  "${tm:-?} tok/s, ${fm:-?} model TFLOP/s = ${pm:-?} of the bf16 GEMM ceiling"
profile_row "medium 8×1024 bf16"
fi
# FP8: the backend opens cuBLASLt's block-scaled FP8 GEMM on the tensor cores when it agrees with
# the CUDA-core kernel (its `device` line says which engine runs and why); small first, medium
# (goal FP8 ≥ 1.3× BF16) only on the tensor cores, where a step stays short. FP8 runs over the
# BF16 baseline (head and attention BF16, GemmPrecision::device_baseline), so the ratio is the
# FP8 Linears' alone
fp8out=$(bench configs/small.toml 8 128 5 --no-mtp --precision fp8 2>/tmp/gpu-check-fp8.log)
read -r tf8 ff8 pf8 <<< "$fp8out"
cat /tmp/gpu-check-fp8.log
engine=$(grep -o "fp8 gemm: [^;)]*" /tmp/gpu-check-fp8.log | head -1)
row "small 8×128 fp8 recipe vs bf16 (${engine:-engine unknown})" "$([ -n "$tf8" ] && echo measured || echo FAIL)" \
  "${tf8:-?} tok/s = $(python3 -c "print(f'{${tf8:-0}/max(${t8:-0},1):.2f}')")× bf16; ${ff8:-?} TFLOP/s; $(grep -o "fp8 gemm: [^)]*)" /tmp/gpu-check-fp8.log | head -1)"
if over_budget "medium 8×1024 fp8 vs bf16 (goal ≥ 1.3×)"; then
  :
elif echo "$engine" | grep -q "tensor cores"; then
  read -r tmf fmf pmf < <(bench configs/medium.toml 8 1024 2 --precision fp8 --profile)
  row "medium 8×1024 fp8 vs bf16 (goal ≥ 1.3×)" "$([ -n "$tmf" ] && echo measured || echo FAIL)" \
    "${tmf:-?} tok/s = $(python3 -c "print(f'{${tmf:-0}/max(${tm:-0},1):.2f}')")× bf16; ${fmf:-?} model TFLOP/s = ${pmf:-?} of the bf16 GEMM ceiling"
  profile_row "medium 8×1024 fp8"
else
  row "medium 8×1024 fp8 vs bf16 (goal ≥ 1.3×)" "not run" "FP8 is on the CUDA cores: ${engine:-?}"
fi
for p in f32 bf16 fp8; do
  line=$("$BIN/phalanx" bench train --device cuda --config configs/tiny.toml --steps 1 --precision $p 2>&1 | grep "GEMM ceiling:" | head -1)
  ceiling=$(echo "$line" | grep -o "ceiling: [0-9.]* TFLOP/s (.*)")
  row "$p GEMM ceiling (reference: bf16 808, f32 51, fp8 block-scaled 1,307 TFLOP/s)" "$([ -n "$ceiling" ] && echo measured || echo FAIL)" "${line:-?}"
done

echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"

#!/usr/bin/env bash
# Hybrid benchmarks on the GPU machine (issue 5). Build here first with
#   scripts/build-device-bins.sh
# then run there:  bash scripts/device-hybrid-bench.sh   (PART="a b c" picks parts:
# a = golden + bf16 decode/prefill, b = int4 + resident layers, c = the layer alone)
# Qwen3-30B-A3B shapes with dummy weights; routed experts on the CPU pool.
set -uo pipefail
B=.gpu-carry
Q=examples/configs/qwen3-30b-a3b
T=${THREADS:-15}
export LVLLM_FIXTURES=$PWD/tests/fixtures
log() { tee -a "${OUT:-/tmp}/hybrid.log"; }
bench() { timeout "${LIMIT:-280}" "$B/lvllm" bench --device cuda --model $Q --load-format dummy --threads "$T" "$@" 2>&1 | log; }
for part in ${PART:-a b}; do
case "$part" in
a)
  echo "== golden: hybrid vs HF f32 and vs all-GPU" | log
  "$B/golden_cuda" --nocapture 2>&1 | grep -E "cosine|greedy|result|panicked|SKIPPED" | log
  echo "== hybrid bf16 experts, all MoE layers on the CPU" | log
  bench --moe-placement hybrid --moe-weight keep --batch-sizes 1,4,16 --output-len "${STEPS:-24}" --prefill-lens 512,4096
  ;;
b)
  echo "== hybrid int4 experts" | log
  bench --moe-placement hybrid --moe-weight int4 --batch-sizes 1,4,16 --output-len "${STEPS:-24}"
  echo "== hybrid bf16, layers 0-11 resident in VRAM" | log
  bench --moe-placement hybrid --moe-weight keep --gpu-resident-moe-layers 0-11 --batch-sizes 1 --output-len "${STEPS:-24}"
  ;;
c)
  echo "== one MoE layer alone on the CPU (same threads), for comparison" | log
  "$B/moe_layer_bench" --threads "$T" --formats bf16,int4 --m 1,4,16 --secs 1 2>&1 | log
  ;;
esac
done
echo "== summary"
grep -E "test result|^# |^\| [0-9]|^(bf16|int4) " "${OUT:-/tmp}/hybrid.log"

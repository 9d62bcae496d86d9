#!/usr/bin/env bash
# Issue 5 on the GPU machine, in one call: GPU kernel tests, golden fixtures
# (all-GPU, hybrid, resident), the serving check, per-kernel decode times (ncu),
# the CPU pipeline with its time breakdown, and `lvllm bench` for every figure
# the issue asks for. Build here first: scripts/build-device-bins.sh
# PART=quick runs only the batch-1 figures (int4, bf16, layers 0-11 resident)
# and the CPU pipeline's breakdown, for another sample on another machine.
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
Q=examples/configs/qwen3-30b-a3b
export LVLLM_FIXTURES=$PWD/tests/fixtures
log() { tee -a "${OUT:-/tmp}/issue5.log"; }
bench() { timeout "${LIMIT:-200}" "$B/lvllm" bench --device cuda --model $Q --load-format dummy "$@" 2>&1 | grep -E "^#|^\| [0-9]" | log; }
if [ "${PART:-all}" = quick ]; then
  "$B/golden_cuda" 2>&1 | grep -E "result|panicked" | log
  "$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 1024 --gap-us 40 2>&1 | grep -A1 topk | log
  for w in "int4" "keep" "keep --gpu-resident-moe-layers 0-11" "int4"; do
    echo "== batch 1, --moe-weight $w" | log
    LIMIT=100 bench --threads "$T" --moe-placement hybrid --moe-weight $w --batch-sizes 1 --output-len 16
  done
  exit 0
fi
echo "== GPU kernels vs references" | log
"$B/gpu_kernels_test" --nocapture 2>&1 | grep -E "result|panicked|SKIPPED" | log
echo "== golden fixtures vs HF f32, hybrid vs all-GPU" | log
"$B/golden_cuda" --nocapture 2>&1 | grep -E "cosine|greedy|result|panicked" | log
"$B/server_bundled" gpu_and_cpu 2>&1 | grep -E "result|panicked" | log
timeout 120 "$B/load_test" --device cuda --moe-placement hybrid 2>&1 | tail -1 | log
echo "== ncu: all-GPU decode kernels, batch 1, eager" | log
timeout 150 ncu --metrics gpu__time_duration.sum --csv -k 'regex:gemv|qk_norm|router_fused|add_rmsnorm|moe_combine|paged_attention' \
  --launch-skip 1100 --launch-count 330 "$B/lvllm" bench --device cuda --model $Q --load-format dummy \
  --moe-placement gpu --batch-sizes 1 --output-len 12 --enforce-eager > "${OUT:-/tmp}/ncu.csv" 2> "${OUT:-/tmp}/ncu.err"
echo "== CPU pipeline, int4, 48 layers, gap 40 µs" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 2048 --gap-us 40 2>&1 | grep -A1 topk | log
echo "== hybrid int4, all MoE layers on the CPU ($T and 14 threads)" | log
bench --threads "$T" --moe-placement hybrid --moe-weight int4 --batch-sizes 1,4,16 --output-len 16
bench --threads 14 --moe-placement hybrid --moe-weight int4 --batch-sizes 1 --output-len 16
echo "== hybrid bf16, all MoE layers on the CPU, prefill" | log
LIMIT=260 bench --threads "$T" --moe-placement hybrid --moe-weight keep --batch-sizes 1,4,16 --output-len 16 --prefill-lens 512,4096
echo "== hybrid bf16, layers 0-11 resident" | log
bench --threads "$T" --moe-placement hybrid --moe-weight keep --gpu-resident-moe-layers 0-11 --batch-sizes 1 --output-len 16
echo "== all-GPU" | log
bench --moe-placement gpu --batch-sizes 1,8 --output-len 32

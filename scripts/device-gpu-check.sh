#!/usr/bin/env bash
# GPU suite on the GPU machine, in one call. Build here first with
#   scripts/build-device-bins.sh     (also builds the `--features cuda` test binaries)
# then run there:  bash scripts/device-gpu-check.sh   (short table last)
set -uo pipefail
B=.gpu-carry
export LVLLM_FIXTURES=$PWD/tests/fixtures
log() { tee -a "${OUT:-/tmp}/gpu-check.log"; }
echo "== kernels vs CPU references";      "$B/gpu_kernels_test" --nocapture 2>&1 | grep -E "max|device|result|panicked|SKIPPED" | log
echo "== golden fixtures vs HF f32";      "$B/golden_cuda" --nocapture 2>&1 | grep -E "cosine|result|panicked|SKIPPED" | log
echo "== engine: GPU vs CPU greedy chat"; "$B/server_bundled" --nocapture gpu_and_cpu 2>&1 | grep -E "gpu|result|panicked|SKIPPED" | log
echo "== lvllm generate --device cuda (KV cache from --gpu-memory-utilization)"; "$B/lvllm" generate --device cuda --gpu-memory-utilization 0.01 --prompt hi 2>&1 | tail -1 | log
echo "== lvllm generate --device cuda";   "$B/lvllm" generate --device cuda --chat --prompt "What is the capital of France?" \
    --chat-template-kwargs '{"enable_thinking": false}' 2>&1 | log
echo "== serving on the GPU: 64 concurrent streaming requests through the scheduler (all-GPU, then hybrid)"
timeout 200 "$B/load_test" --device cuda 2>&1 | tail -3 | log
timeout 200 "$B/load_test" --device cuda --moe-placement hybrid 2>&1 | tail -3 | log
echo "== decode, Qwen3-30B-A3B shapes, dummy weights, all experts on the GPU"
Q=examples/configs/qwen3-30b-a3b
timeout 200 "$B/lvllm" bench --device cuda --model $Q --load-format dummy --moe-placement gpu --batch-sizes 1,8 --output-len "${STEPS:-32}" 2>&1 | log
timeout 200 "$B/lvllm" bench --device cuda --model $Q --load-format dummy --moe-placement gpu --batch-sizes 1,8 --output-len "${STEPS:-32}" --enforce-eager 2>&1 | log
echo "== summary"
grep -E "test result|cosine|decode tok/s|concurrent|^\| [0-9]" "${OUT:-/tmp}/gpu-check.log"

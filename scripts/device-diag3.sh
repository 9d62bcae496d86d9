#!/usr/bin/env bash
# Decode-time diagnostics (issue 5), round 3: contiguous chunks that span
# experts (tasks per thread × block cap × prefetch), then per-kernel GPU times
# of the all-GPU decode step (ncu, decode kernels only).
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
log() { tee -a "${OUT:-/tmp}/diag3.log"; }
echo "== 48 layers, m=1, gap 57 µs: chunking and prefetch" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 4096 --gap-us 57 \
    --tasks-per-thread 16,4,2,1 --max-blocks 8,64 --prefetch 2048,8192 2>&1 | log
"$B/moe_pipeline_bench" --threads "$T" --format bf16 --layers 48 --steps 6 --probe-mib 1024 --gap-us 57 \
    --tasks-per-thread 16,2,1 --max-blocks 8,64 --prefetch 2048 2>&1 | grep topk | log
echo "== ncu: all-GPU decode kernels, batch 1, eager" | log
timeout 200 ncu --metrics gpu__time_duration.sum --csv -k 'regex:gemv|qk_norm|router_fused|add_rmsnorm|moe_combine' \
  --launch-skip 1000 --launch-count 300 "$B/lvllm" bench --device cuda --model examples/configs/qwen3-30b-a3b --load-format dummy \
  --moe-placement gpu --batch-sizes 1 --output-len 12 --enforce-eager > "${OUT:-/tmp}/ncu.csv" 2> "${OUT:-/tmp}/ncu.err"
tail -3 "${OUT:-/tmp}/ncu.err"

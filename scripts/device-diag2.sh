#!/usr/bin/env bash
# Decode-time diagnostics on the GPU machine (issue 5): software-prefetch
# settings of the CPU expert kernels, the fixed per-layer cost (top-k sweep),
# and per-kernel GPU times of an all-GPU decode step (ncu).
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
log() { tee -a "${OUT:-/tmp}/diag2.log"; }
echo "== $T threads streaming their own share: kernel vs plain read, prefetch settings" | log
for r in 0 2; do "$B/kernel_stream" --threads "$T" --mib 8192 --reps 2 --blocks-per-run $r --prefetch 2048,0,4096,8192,2048l2,8192l2,16384l2 2>&1 | log; done
echo "== 48 layers, m=1, gap 57 µs: prefetch settings" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 4096 --gap-us 57 \
    --prefetch 2048,0,8192,2048l2,8192l2,16384l2 2>&1 | log
echo "== 48 layers, gap 57 µs: top-k sweep (fixed cost per layer)" | log
for k in 2 4 16; do "$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 1024 --gap-us 57 --topk $k --prefetch 2048,8192l2 2>&1 | grep topk | log; done
"$B/moe_pipeline_bench" --threads "$T" --format bf16 --layers 48 --steps 6 --probe-mib 1024 --gap-us 57 --prefetch 2048,8192l2 2>&1 | grep topk | log
echo "== ncu: all-GPU decode kernels, batch 1, eager" | log
timeout 240 ncu --metrics gpu__time_duration.sum --csv -k 'regex:gemv|qk_norm|paged_attention|router|add_rmsnorm|moe_|silu|gather|scatter|rmsnorm|add_inplace' \
  --launch-skip 2000 --launch-count 400 "$B/lvllm" bench --device cuda --model examples/configs/qwen3-30b-a3b --load-format dummy \
  --moe-placement gpu --batch-sizes 1 --output-len 8 --enforce-eager > "${OUT:-/tmp}/ncu.csv" 2> "${OUT:-/tmp}/ncu.err"
tail -3 "${OUT:-/tmp}/ncu.err"

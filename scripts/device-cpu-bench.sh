#!/usr/bin/env bash
# CPU expert-engine benchmarks on the GPU machine's Xeon (see ../shared/DEVICE.md).
# Build here first:   scripts/build-device-bins.sh   (puts binaries in .gpu-carry/)
# Then run there:     bash scripts/device-cpu-bench.sh   (writes logs to $OUT if set)
set -uo pipefail
B=.gpu-carry
OUT=${OUT:-/tmp/lvllm-out}
mkdir -p "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|NUMA" | tee "$OUT/lscpu.txt"
echo "== bandwidth probe (1 GiB per node, best of 5, 1..16 threads)"
"$B/bandwidth" 1024 5 16 2>&1 | tee "$OUT/bandwidth.txt"
echo "== pool dispatch latency (criterion)"
"$B/pool_bench" --bench --warm-up-time 1 --measurement-time 2 2>&1 | grep -E "^[a-z_/0-9]+ +time|time:" | tee "$OUT/pool.txt"
echo "== MoE layer, Qwen3-30B-A3B shape"
"$B/moe_layer_bench" --threads "${THREADS:-15}" --formats "${FORMATS:-bf16,int4,int4-f32act,fp8}" --m "${MS:-1,4,16,256,2048}" --secs "${SECS:-1}" 2>&1 | tee "$OUT/moe_layer.txt"

#!/usr/bin/env bash
# Builds the release binaries the device scripts run and copies them into
# .gpu-carry/ (ignored by git), stripped so they fit the carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-carry
cargo build --release -p lvllm-moe --example moe_layer_bench --example moe_pipeline_bench --example kernel_stream -p lvllm-numa --example bandwidth
cp target/release/examples/moe_layer_bench target/release/examples/moe_pipeline_bench target/release/examples/kernel_stream target/release/examples/bandwidth .gpu-carry/
pool=$(cargo bench -p lvllm-numa --bench pool --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
cp "$pool" .gpu-carry/pool_bench
kern=$(cargo bench -p lvllm-kernels-cpu --bench kernels --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
cp "$kern" .gpu-carry/kernels_bench
# CUDA-feature binaries: kernel tests, golden GPU tests, the engine GPU test, the CLI (generate, bench).
cargo build --release --features cuda -p lvllm-server --bin lvllm --example load_test
cp target/release/lvllm target/release/examples/load_test .gpu-carry/
bins=$(cargo test --release --features cuda -p lvllm-kernels-cuda -p lvllm-models -p lvllm-server --no-run 2>&1 | sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\)).*/\1 \2/p')
cp "$(echo "$bins" | awk '$1=="gpu"{print $2}')" .gpu-carry/gpu_kernels_test
cp "$(echo "$bins" | awk '$1=="golden_cuda"{print $2}')" .gpu-carry/golden_cuda
cp "$(echo "$bins" | awk '$1=="bundled"{print $2}')" .gpu-carry/server_bundled
strip .gpu-carry/* 2>/dev/null || true
ls -la .gpu-carry

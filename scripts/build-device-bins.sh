#!/usr/bin/env bash
# Builds the release binaries the device scripts run and copies them into
# .gpu-carry/ (ignored by git), stripped so they fit the carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-carry
cargo build --release -p lvllm-moe --example moe_layer_bench -p lvllm-numa --example bandwidth
cp target/release/examples/moe_layer_bench target/release/examples/bandwidth .gpu-carry/
pool=$(cargo bench -p lvllm-numa --bench pool --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
cp "$pool" .gpu-carry/pool_bench
kern=$(cargo bench -p lvllm-kernels-cpu --bench kernels --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
cp "$kern" .gpu-carry/kernels_bench
strip .gpu-carry/* 2>/dev/null || true
ls -la .gpu-carry

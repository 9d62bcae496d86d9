#!/usr/bin/env bash
# Issue 5: the batch-1 figures alone (int4, bf16, layers 0-11 resident) and the
# CPU pipeline's per-thread breakdown, for another sample on another machine.
# Build first: scripts/build-device-bins.sh
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
Q=examples/configs/qwen3-30b-a3b
export LVLLM_FIXTURES=$PWD/tests/fixtures
log() { tee -a "${OUT:-/tmp}/issue5-quick.log"; }
bench() { timeout "${LIMIT:-100}" "$B/lvllm" bench --device cuda --model $Q --load-format dummy --threads "$T" --batch-sizes 1 --output-len 16 "$@" 2>&1 | grep -E "^# CPU|^\| [0-9]" | log; }
"$B/golden_cuda" 2>&1 | grep -E "result|panicked" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 1024 --gap-us 40 2>&1 | grep -A1 topk | log
echo "== int4" | log; bench --moe-placement hybrid --moe-weight int4
echo "== bf16" | log; bench --moe-placement hybrid --moe-weight keep
echo "== resident 0-11 (bf16)" | log; bench --moe-placement hybrid --moe-weight keep --gpu-resident-moe-layers 0-11
echo "== int4 again" | log; bench --moe-placement hybrid --moe-weight int4

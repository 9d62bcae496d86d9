#!/usr/bin/env bash
# Issue 5: the batch-1 figures alone (int4, bf16, layers 0-11 resident), for a
# second sample on another machine. Build first: scripts/build-device-bins.sh
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
Q=examples/configs/qwen3-30b-a3b
log() { tee -a "${OUT:-/tmp}/issue5-quick.log"; }
bench() { timeout "${LIMIT:-100}" "$B/lvllm" bench --device cuda --model $Q --load-format dummy --threads "$T" --batch-sizes 1 --output-len 16 "$@" 2>&1 | grep -E "^# CPU|^\| [0-9]" | log; }
echo "== resident 0-11 (bf16)" | log; bench --moe-placement hybrid --moe-weight keep --gpu-resident-moe-layers 0-11
echo "== int4" | log; bench --moe-placement hybrid --moe-weight int4
echo "== bf16" | log; bench --moe-placement hybrid --moe-weight keep

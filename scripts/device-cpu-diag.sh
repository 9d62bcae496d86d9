#!/usr/bin/env bash
# Where the CPU expert time goes at decode sizes, on the GPU machine's Xeon.
# Build here first with scripts/build-device-bins.sh; run there:
#   bash scripts/device-cpu-diag.sh     (log in $OUT/cpu-diag.log)
set -uo pipefail
B=.gpu-carry
T=${THREADS:-15}
log() { tee -a "${OUT:-/tmp}/cpu-diag.log"; }
echo "== one thread: kernel vs a plain read of the same runs of blocks (restart cost of short runs)" | log
for r in 0 1 2 8; do "$B/kernel_stream" --mib 2048 --reps 3 --blocks-per-run $r 2>&1 | log; done
echo "== 48 layers, m=1, $T threads: task sizes" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 4096 \
    --tasks-per-thread "${TPT:-16,4,2,1}" --max-blocks "${MAXB:-8,48}" 2>&1 | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 4096 --gap-us 57 \
    --tasks-per-thread 16,2 --max-blocks 8,48 2>&1 | log
echo "== 48 layers, m=1, gap 40 µs: schedules and prefetch distances, with the per-thread time breakdown" | log
"$B/moe_pipeline_bench" --threads "$T" --format int4 --layers 48 --steps 8 --probe-mib 2048 --gap-us 40 \
    --schedule regions,chunks --prefetch 2048,4096,8192 2>&1 | grep -A1 topk | log
echo "== $T threads streaming their own share: kernel vs plain read, prefetch settings" | log
for r in 0 2; do "$B/kernel_stream" --threads "$T" --mib 8192 --reps 2 --blocks-per-run $r --prefetch 2048,4096,8192,8192l2 2>&1 | log; done

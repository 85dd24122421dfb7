#!/bin/bash
# End-to-end vLLM: FLASH_ATTN (dense FA3) and CUSTOM (sparse-serve) in one device run, same
# machine, same settings. Usage: LENS="32768 126976" bash benchmarks/device/e2e_vllm.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm || exit 1
export SPARSE_SERVE_STATS_EVERY_S=${SPARSE_SERVE_STATS_EVERY_S:-30} SPARSE_SERVE_METRICS_EVERY_S=${SPARSE_SERVE_METRICS_EVERY_S:-1}
LENS=${LENS:-"4096 32768 126976"}
for backend in ${BACKENDS:-FLASH_ATTN CUSTOM}; do
  timeout ${PER_BACKEND_S:-280} python3 benchmarks/bench_vllm_e2e.py --backend $backend \
    --lens $LENS --output-len ${OUTPUT_LEN:-129} --repeats ${REPEATS:-1} ${E2E_ARGS:-} \
    --out "$OUT/e2e_$backend.json" > "$OUT/e2e_$backend.log" 2>&1
  echo "== $backend rc=$?"
  grep -E "TTFT|batch |compiled|sparse-serve|Error|error|Traceback" "$OUT/e2e_$backend.log" | grep -v "^$" | tail -25
done

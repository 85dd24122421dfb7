#!/bin/bash
# End-to-end vLLM: FLASH_ATTN (dense FA3) and CUSTOM (sparse-serve), same machine, same settings.
#   LENS="32768 126976" bash benchmarks/device/e2e_vllm.sh
# One process per backend, one after the other; PARALLEL=1 on a machine with one GPU per
# backend runs them at the same time, backend k on GPU k (separate GPUs of one kind, so the
# timings stay comparable; the log names the GPUs). E2E_ARGS passes more options to
# bench_vllm_e2e.py (e.g. "--decode-batch 16 --decode-len 32768"). TAG names the outputs
# (e2e_BACKEND_TAG.json/.log), so that several CUSTOM settings can run one after the other.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm || exit 1
export SPARSE_SERVE_STATS_EVERY_S=${SPARSE_SERVE_STATS_EVERY_S:-30} SPARSE_SERVE_METRICS_EVERY_S=${SPARSE_SERVE_METRICS_EVERY_S:-1}
LENS=${LENS:-"4096 32768 126976"}
SUFFIX=${TAG:+_$TAG}
run_one() {  # backend gpu
  CUDA_VISIBLE_DEVICES=$2 timeout ${PER_BACKEND_S:-280} python3 benchmarks/bench_vllm_e2e.py \
    --backend $1 --lens $LENS --output-len ${OUTPUT_LEN:-129} --repeats ${REPEATS:-1} \
    ${E2E_ARGS:-} --out "$OUT/e2e_$1$SUFFIX.json" > "$OUT/e2e_$1$SUFFIX.log" 2>&1
  echo "== $1 (GPU $2) rc=$?"
}
report() {
  grep -E "TTFT|batch |compiled|sparse-serve stats|JIT|Error|error|Traceback" "$OUT/e2e_$1$SUFFIX.log" | grep -v "^$" | tail -20
}
nvidia-smi --query-gpu=index,name --format=csv,noheader
# GPU0: the first GPU to use (e.g. 1 when GPU 0 runs something else)
gpu=${GPU0:-0}
if [ "${PARALLEL:-0}" = 1 ]; then
  for b in ${BACKENDS:-FLASH_ATTN CUSTOM}; do run_one $b $gpu & gpu=$((gpu + 1)); done
  wait
  for b in ${BACKENDS:-FLASH_ATTN CUSTOM}; do echo "-- $b"; report $b; done
else
  for b in ${BACKENDS:-FLASH_ATTN CUSTOM}; do run_one $b $gpu; report $b; done
fi

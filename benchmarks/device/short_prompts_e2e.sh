#!/bin/bash
# Short prompts end to end: 4K prompts, TPOT at batch 1 and the decode step at batch 16, in a
# 4K engine and in a 128K engine (max_model_len 131072, where the block table is as wide as a
# long-context deployment's), FLASH_ATTN then CUSTOM under each SPARSE_DECODE_DENSE_ROWS
# setting ("default": the variable unset), one after the other on this GPU (same machine:
# only same-machine ratios compare).
#   ENGINES="4k 128k" SETTINGS="default triton" REPEATS=3 bash benchmarks/device/short_prompts_e2e.sh
# Outputs: $OUT/e2e_<backend>_<engine>[_<setting>].json/.log (e2e_vllm.sh).
set -uo pipefail
export OUT=${OUT:-/tmp/out}
for eng in ${ENGINES:-4k 128k}; do
  case $eng in
    4k) extra="" ;;
    128k) extra="--max-model-len 131072" ;;
    *) echo "unknown engine $eng (4k, 128k)"; exit 2 ;;
  esac
  args="--decode-batch 16 --decode-len 4096 $extra"
  if [ "${SKIP_DENSE:-0}" != 1 ]; then
    BACKENDS=FLASH_ATTN TAG=$eng LENS=4096 REPEATS=${REPEATS:-3} E2E_ARGS="$args" \
      bash benchmarks/device/e2e_vllm.sh
  fi
  for s in ${SETTINGS:-default}; do
    if [ "$s" = default ]; then unset SPARSE_DECODE_DENSE_ROWS
    else export SPARSE_DECODE_DENSE_ROWS=$s; fi
    BACKENDS=CUSTOM TAG=${eng}_$s LENS=4096 REPEATS=${REPEATS:-3} \
      E2E_ARGS="$args" bash benchmarks/device/e2e_vllm.sh
  done
done

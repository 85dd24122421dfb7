#!/bin/bash
# Short prompts end to end: 4K prompts, TPOT at batch 1 and the decode step at batch 16, in a
# 4K engine and in a 128K engine (max_model_len 131072, where the block table is as wide as a
# long-context deployment's), FLASH_ATTN then CUSTOM under each setting, one after the other
# on this GPU (same machine: only same-machine ratios compare): "default" (no variable set),
# "split" / "balanced" (SPARSE_DECODE_DENSE_KERNEL), "tuned" (the default config with the
# balanced kernel's launch constants of TUNED_BALANCED, e.g. "PROGRAMS_PER_SM=3", through the
# tooling variable SPARSE_SERVE_BALANCED_DECODE), a name NAME for which SETTING_NAME holds
# variable assignments (e.g. SETTING_s15="SPARSE_SERVE_BALANCED_DECODE=INLINE_MERGE=0
# SPARSE_SERVE_PAGE_SELECT=SCORE_CHUNK_MAX=256"), else a SPARSE_DECODE_DENSE_ROWS value.
#   ENGINES="4k 128k" SETTINGS="default triton" REPEATS=3 bash benchmarks/device/short_prompts_e2e.sh
# ROUNDS=N (N > 1) repeats the whole sequence N times, interleaving the backends (FLASH_ATTN,
# CUSTOM, FLASH_ATTN, CUSTOM, ...): batch-16 steps move by 2-4% between runs of the same code,
# so a 3% comparison wants several rounds. Outputs: $OUT/e2e_<backend>_<engine>[_<setting>][_rN]
# .json/.log (e2e_vllm.sh); `python3 benchmarks/compare_e2e.py $OUT` prints the ratios.
set -uo pipefail
export OUT=${OUT:-/tmp/out}
outer_balanced=${SPARSE_SERVE_BALANCED_DECODE-}
outer_select=${SPARSE_SERVE_PAGE_SELECT-}
outer_pipeline=${SPARSE_SERVE_PIPELINE-}
rounds=${ROUNDS:-1}
for ((r = 1; r <= rounds; r++)); do
  suffix=""; [ "$rounds" -gt 1 ] && suffix="_r$r"
  for eng in ${ENGINES:-4k 128k}; do
    case $eng in
      4k) extra="" ;;
      128k) extra="--max-model-len 131072" ;;
      *) echo "unknown engine $eng (4k, 128k)"; exit 2 ;;
    esac
    args="--decode-batch 16 --decode-len 4096 $extra"
    unset SPARSE_DECODE_DENSE_ROWS SPARSE_DECODE_DENSE_KERNEL  # (set by the last setting)
    if [ "${SKIP_DENSE:-0}" != 1 ]; then
      BACKENDS=FLASH_ATTN TAG=$eng$suffix LENS=4096 REPEATS=${REPEATS:-3} E2E_ARGS="$args" \
        bash benchmarks/device/e2e_vllm.sh
    fi
    for s in ${SETTINGS:-default}; do
      unset SPARSE_DECODE_DENSE_ROWS SPARSE_DECODE_DENSE_KERNEL
      export SPARSE_SERVE_BALANCED_DECODE=$outer_balanced
      export SPARSE_SERVE_PAGE_SELECT=$outer_select
      export SPARSE_SERVE_PIPELINE=$outer_pipeline
      setting_var=SETTING_$s
      case $s in
        default) ;;
        split|balanced) export SPARSE_DECODE_DENSE_KERNEL=$s ;;
        tuned) export SPARSE_SERVE_BALANCED_DECODE=${TUNED_BALANCED:?TUNED_BALANCED} ;;
        *) if [ -n "${!setting_var:-}" ]; then export ${!setting_var}
           else export SPARSE_DECODE_DENSE_ROWS=$s; fi ;;
      esac
      BACKENDS=CUSTOM TAG=${eng}_$s$suffix LENS=4096 REPEATS=${REPEATS:-3} \
        E2E_ARGS="$args" bash benchmarks/device/e2e_vllm.sh
    done
  done
done
python3 benchmarks/compare_e2e.py "$OUT" || true

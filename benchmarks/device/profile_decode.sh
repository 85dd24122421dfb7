#!/bin/bash
# Where a decode step's time goes, FLASH_ATTN against CUSTOM: the batch-16 decode of
# bench_vllm_e2e.py (4K prompts in a 128K engine by default), then a torch profile of
# PROFILE_STEPS more steps of it from vLLM's worker (--profile-dir), summarized per kernel group
# and name by benchmarks/profile_summary.py (profile_summary.json; traces under $OUT/prof_*).
#   OUT=/tmp/res/prof bash benchmarks/device/profile_decode.sh
#   BACKENDS=CUSTOM DECODE_LEN=32768 MAX_MODEL_LEN=131072 bash benchmarks/device/profile_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm || exit 1
STEPS=${PROFILE_STEPS:-16}
dirs=()
for b in ${BACKENDS:-FLASH_ATTN CUSTOM}; do
  timeout ${PER_BACKEND_S:-420} python3 benchmarks/bench_vllm_e2e.py --backend $b --lens 4096 \
    --output-len ${OUTPUT_LEN:-65} --repeats 1 --decode-batch ${BATCH:-16} \
    --decode-len ${DECODE_LEN:-4096} --max-model-len ${MAX_MODEL_LEN:-131072} \
    --profile-dir "$OUT/prof_$b" --profile-steps $STEPS --out "$OUT/e2e_${b}_prof.json" \
    > "$OUT/e2e_${b}_prof.log" 2>&1
  echo "== $b rc=$?"; grep -E "batch |Error|Traceback" "$OUT/e2e_${b}_prof.log" | tail -3
  dirs+=("$OUT/prof_$b")
done
python3 benchmarks/profile_summary.py "${dirs[@]}" --steps $STEPS --out "$OUT/profile_summary.json"

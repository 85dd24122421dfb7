#!/bin/bash
# One device job: the decode kernels' tests compiled, the balanced dense-mode kernel's variants
# at 4K x batch 16 (bench_decode_engine.py; CONTEXTS="4096 131072" for more), the fastest
# picked (pick_balanced.py), then the end-to-end A/B of the default against it in a 128K
# engine (short_prompts_e2e.sh, ROUNDS interleaved with FLASH_ATTN), then a profile of
# CUSTOM's default decode step (profile_decode.sh). Results under $RES (/tmp/res): tests.log,
# eng4k.json/.log, e/, prof/. SETTINGS (short_prompts_e2e.sh's) given: no pick, those run.
# MIXED_VARIANTS: also those variants on mixed batches (8 x 4K + 8 x 32K / 128K; mixed.json).
# TRACES: tooling settings (SPARSE_SERVE_BALANCED_DECODE values, "-" for the defaults) to trace
# per program at 4K x 16 (trace_balanced.py; trace_K.json). SKIP_E2E=1: stop before the e2e.
#   VARIANTS="balanced balanced_p3" ROUNDS=2 bash benchmarks/device/balanced_ab.sh
set -uo pipefail
RES=${RES:-/tmp/res}; mkdir -p "$RES"
source benchmarks/device/setup_env.sh vllm || exit 1
if [ -d /tmp/whl ]; then
  pip install -q --no-index --no-deps --target /tmp/site-pytest /tmp/whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site-pytest
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q ${TESTS:-tests/kernels/test_balanced_decode.py \
    tests/kernels/test_decode_stats.py tests/kernels/test_pipeline.py tests/vllm} \
    > "$RES/tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$RES/tests.log"
fi
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_decode_engine.py --require-fa3 --contexts ${CONTEXTS:-4096} \
  --batches ${BATCHES:-16} --iters 20 ${BENCH_ARGS:-} --variants ${VARIANTS:-balanced balanced_p3 balanced_p5} \
  --variant-plans topk_auto dense --out "$RES/eng4k.json" > "$RES/eng4k.log" 2>&1
echo "bench rc=$?"
python3 benchmarks/device/print_decode_engine.py "$RES/eng4k.json" 2>/dev/null | tail -30
if [ -n "${MIXED_VARIANTS:-}" ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_decode_engine.py --require-fa3 \
    --contexts 131072 32768 --batches 16 --iters 20 ${BENCH_ARGS:-} --short-rows 8 \
    --variants $MIXED_VARIANTS --variant-plans topk_auto --out "$RES/mixed.json" > "$RES/mixed.log" 2>&1
  echo "mixed rc=$?"
  python3 benchmarks/device/print_decode_engine.py "$RES/mixed.json" 2>/dev/null | tail -20
fi
k=0
for t in ${TRACES:-}; do
  k=$((k + 1)); [ "$t" = - ] && t=""
  SPARSE_SERVE_BALANCED_DECODE="$t" timeout 200 python3 benchmarks/trace_balanced.py --context 4096 \
    --batch 16 --repeats 5 --out "$RES/trace_$k.json" > "$RES/trace_$k.log" 2>&1
  echo "trace $k (${t:-defaults}) rc=$?"; tail -6 "$RES/trace_$k.log"
done
[ "${SKIP_E2E:-0}" = 1 ] && exit 0
if [ -n "${SETTINGS:-}" ]; then
  settings=$SETTINGS value=""
else
  read -r picked value < <(python3 benchmarks/device/pick_balanced.py "$RES/eng4k.json" topk_auto)
  echo "picked $picked ${value:-(no launch constants: the code defaults)}"
  settings=default
  [ -n "${value:-}" ] && settings="default tuned"
fi
OUT=$RES/e TUNED_BALANCED=${value:-} ROUNDS=${ROUNDS:-2} ENGINES=128k SETTINGS="$settings" \
  bash benchmarks/device/short_prompts_e2e.sh
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  OUT=$RES/prof BACKENDS=CUSTOM PER_BACKEND_S=300 bash benchmarks/device/profile_decode.sh
fi

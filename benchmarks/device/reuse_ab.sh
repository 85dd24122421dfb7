#!/bin/bash
# One device job for selection reuse (SPARSE_SELECTION_REUSE): the GPU tests of the decode
# selection compiled, the decode-step kernel benchmark (bench_decode_engine.py: topk_auto
# against topk_auto_kept, the step in which every row keeps its selection) at 32K / 128K and
# batch 1 / 16, then end to end in vLLM (bench_vllm_e2e.py: the batch-1 rows of LENS and the
# 16 x 32K batch row) for FLASH_ATTN, CUSTOM with reuse R for each R in REUSE, CUSTOM at the
# defaults, then host_overhead.sh (with OLD_TAR: an earlier commit in the same job).
# Results under $RES (/tmp/res): tests.log, eng.json/.log, e2e/ (CUSTOM with reuse R: e2e_CUSTOM__reuseR,
# which compare_e2e.py pairs with FLASH_ATTN as setting reuseR), host/.
#   REUSE="4 8" LENS=126976 OLD_TAR=.bundle-cache/old.tar.gz bash benchmarks/device/reuse_ab.sh
# A 16 x 32K batch needs an H200 (an H100 holds 12 x 32K beside the 8B model: DECODE_BATCH=12).
set -uo pipefail
RES=${RES:-/tmp/res}; mkdir -p "$RES"
source benchmarks/device/setup_env.sh vllm || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -d /tmp/whl ]; then
  pip install -q --no-index --no-deps --target /tmp/site-pytest /tmp/whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site-pytest
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider ${TESTS:-\
    tests/kernels/test_selection_reuse.py tests/kernels/test_launch.py \
    tests/kernels/test_decode_select.py tests/kernels/test_pipeline.py \
    tests/kernels/test_decode_stats.py} > "$RES/tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$RES/tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_decode_engine.py --require-fa3 \
    --contexts ${CONTEXTS:-32768 131072} --batches ${BATCHES:-1 16} --iters 20 \
    --table-pages 8192 --out "$RES/eng.json" > "$RES/eng.log" 2>&1
  echo "bench rc=$?"
  python3 - "$RES/eng.json" <<'PY' 2>/dev/null
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    u = r["us_per_layer"]
    print(f"{r['context']:>7} x {r['batch']:>2}: fa3 {u.get('fa3', 0):7.1f}  topk_auto "
          f"{u['topk_auto']:7.1f}  kept {u['topk_auto_kept']:7.1f}  select {u['select_auto']:6.1f}"
          f"  kept==fresh {r.get('max_abs_diff_kept_vs_topk_auto')}")
PY
fi
export OUT=$RES/e2e PER_BACKEND_S=${PER_BACKEND_S:-420} LENS=${LENS:-126976} REPEATS=1
export E2E_ARGS="--decode-batch ${DECODE_BATCH:-16} --decode-len 32768"
BACKENDS=FLASH_ATTN bash benchmarks/device/e2e_vllm.sh
for r in ${REUSE:-4}; do
  SPARSE_SELECTION_REUSE=$r TAG=_reuse$r BACKENDS=CUSTOM bash benchmarks/device/e2e_vllm.sh
  python3 benchmarks/compare_e2e.py "$OUT" 2>/dev/null | tail -12
  [ "${DEFAULT_AFTER_FIRST:-1}" = 1 ] && [ ! -f "$OUT/e2e_CUSTOM.json" ] && \
    BACKENDS=CUSTOM bash benchmarks/device/e2e_vllm.sh
done
python3 benchmarks/compare_e2e.py "$OUT" 2>/dev/null | tail -12
if [ "${SKIP_HOST:-0}" != 1 ]; then
  RES=$RES bash benchmarks/device/host_overhead.sh
fi

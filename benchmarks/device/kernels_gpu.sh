#!/bin/bash
# GPU run of the kernel tests (compiled, not interpreted) and the kernel benchmarks against
# vLLM's FA3, with the vLLM bundle installed (device tool). Writes logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm || exit 1
if [ -d .whl ] && ! python3 -c "import pytest" 2>/dev/null; then python3 -m pip install -q --no-index --no-deps --target /tmp/site-pytest .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site-pytest; fi
python3 -m pip list 2>/dev/null | grep -i -E "^(pytest) " || echo "no pytest: kernel tests skipped"
if python3 -c "import pytest" 2>/dev/null; then
  TRITON_INTERPRET=0 timeout ${KTEST_TIMEOUT:-240} python3 -m pytest -q -x -p no:cacheprovider --ignore=tests/kernels/test_compile_sm90.py tests/kernels 2>&1 | tail -5 | tee "$OUT/kernel_tests_gpu.log"
fi
# DECODE_ARGS: extra bench_decode.py arguments (e.g. the two-stage top-k sweep of docs/gpu-testing.md)
timeout ${DECODE_TIMEOUT:-150} python3 benchmarks/bench_decode.py --require-fa3 ${DECODE_ARGS:-} --out "$OUT/decode.json" 2>&1 | tail -${DECODE_TAIL:-15}
timeout ${PREFILL_TIMEOUT:-200} python3 benchmarks/bench_prefill.py --out "$OUT/prefill.json" 2>&1 | tail -15

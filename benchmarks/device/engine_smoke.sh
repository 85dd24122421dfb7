#!/bin/bash
# GPU smoke test of the registered backends inside the real engines (device tool).
#   bash benchmarks/device/engine_smoke.sh vllm|sglang  -> logs and JSON under $OUT
set -uo pipefail
engine=${1:?vllm or sglang}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh "$engine" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
model=examples/model_shapes/llama-3.1-8b
if [ "$engine" = vllm ]; then
  python3 examples/serve_long_prompts.py --model $model --load-format dummy --backend CUSTOM \
    --input-len ${INPUT_LEN:-4096} --output-len 32 --num-prompts 2 --json "$OUT/vllm_custom.json" ${VLLM_ARGS:-} \
    2>&1 | tee "$OUT/vllm_custom.log" | grep -E "sparse|CUSTOM|Using|TTFT|Error|error" | head -40
else
  python3 - <<'PY'
import logging; logging.basicConfig(level=logging.INFO)
import sglang_sparse, sparse_kernels; print("sglang_sparse from", sglang_sparse.__file__, sparse_kernels.__file__)
from sglang.srt.plugins import load_plugins; load_plugins()
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
print("registered in this process:", "sparse" in ATTENTION_BACKENDS)
PY
  python3 examples/sglang_generate.py --model $model --load-format dummy --backend sparse \
    --input-len ${INPUT_LEN:-4096} --output-len 32 --num-prompts 2 --json "$OUT/sglang_sparse.json" \
    2>&1 | tee "$OUT/sglang_sparse.log" | grep -E "sparse|plugin|attention|generated|prompts of|Error|error" | head -40
fi

#!/bin/bash
# GPU smoke test of the registered backends inside the real engines (device tool).
#   bash benchmarks/device/engine_smoke.sh vllm|sglang  -> logs and JSON under $OUT
set -uo pipefail
engine=${1:?vllm or sglang}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh "$engine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
model=examples/model_shapes/llama-3.1-8b
if [ "$engine" = vllm ]; then
  python3 examples/serve_long_prompts.py --model $model --load-format dummy --backend CUSTOM \
    --input-len ${INPUT_LEN:-4096} --output-len 32 --num-prompts 2 --json "$OUT/vllm_custom.json" \
    2>&1 | tee "$OUT/vllm_custom.log" | grep -E "sparse|CUSTOM|Using|TTFT|Error|error" | head -40
else
  python3 examples/sglang_generate.py --model $model --load-format dummy --backend sparse \
    --input-len ${INPUT_LEN:-4096} --output-len 32 --num-prompts 2 --json "$OUT/sglang_sparse.json" \
    2>&1 | tee "$OUT/sglang_sparse.log" | grep -E "sparse|attention|generated|prompts of|Error|error" | head -40
fi

#!/bin/bash
# `vllm serve` + `vllm bench serve` (random dataset), one server per backend, same machine and
# settings: the engine's own online benchmark, dense FA3 (FLASH_ATTN) against sparse-serve (CUSTOM).
#
#   BACKENDS="FLASH_ATTN CUSTOM" IN=32768 OUTLEN=256 N=32 C=8 bash benchmarks/device/serve_bench.sh
#   BACKENDS=CUSTOM IN=50000 RANGE=0.98 N=200 C=32 OUTLEN=64 bash benchmarks/device/serve_bench.sh
#     (200 requests of 1K..99K input tokens at concurrency 32: the load test)
#
# Dummy weights of Llama-3.1-8B's shape. The random dataset needs a tokenizer: TOKENIZER names a
# folder with one whose vocabulary fits the model's 128256 ids (SmolLM2's 49152-token tokenizer,
# carried as .tok/smollm2). Writes vLLM's result JSON, the server log and a /metrics scrape per
# backend under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm || exit 1
MODEL=${MODEL:-examples/model_shapes/llama-3.1-8b}
TOKENIZER=${TOKENIZER:-.tok/smollm2}
IN=${IN:-32768}; OUTLEN=${OUTLEN:-256}; N=${N:-32}; C=${C:-8}; RANGE=${RANGE:-0.0}
MAXLEN=${MAXLEN:-$(python3 -c "print(int($IN * (1 + $RANGE)) + $OUTLEN + 64)")}
TAG=${TAG:-in${IN}_r${RANGE}_n${N}_c${C}}
PORT=${PORT:-8011}
VLLM="python3 -m vllm.entrypoints.cli.main"
export SPARSE_SERVE_STATS_EVERY_S=${SPARSE_SERVE_STATS_EVERY_S:-30}

for backend in ${BACKENDS:-FLASH_ATTN CUSTOM}; do
  log="$OUT/serve_${backend}_${TAG}.log"
  $VLLM serve "$MODEL" --tokenizer "$TOKENIZER" --load-format dummy \
    --attention-backend "$backend" --max-model-len "$MAXLEN" --port $PORT \
    --no-enable-prefix-caching --gpu-memory-utilization ${GPU_UTIL:-0.88} \
    ${SERVE_ARGS:-} > "$log" 2>&1 &
  server=$!
  up=0
  for _ in $(seq 1 ${START_TIMEOUT_S:-400}); do
    if curl -sf "localhost:$PORT/health" >/dev/null 2>&1; then up=1; break; fi
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if [ $up != 1 ]; then
    echo "== $backend: server did not come up"; tail -30 "$log"; kill $server 2>/dev/null; wait $server 2>/dev/null
    continue
  fi
  $VLLM bench serve --backend vllm --model "$MODEL" --tokenizer "$TOKENIZER" --port $PORT \
    --dataset-name random --random-input-len "$IN" --random-output-len "$OUTLEN" \
    --random-range-ratio "$RANGE" --num-prompts "$N" --max-concurrency "$C" --ignore-eos \
    --seed 0 --save-result --result-dir "$OUT" --result-filename "serve_${backend}_${TAG}.json" \
    --metadata "attention_backend=$backend" "sparse_env=$(env | grep '^SPARSE_' | grep -v SPARSE_SERVE | tr '\n' ' ')" \
    > "$OUT/bench_${backend}_${TAG}.log" 2>&1
  echo "== $backend rc=$?"
  grep -E "Successful requests|Failed|Benchmark duration|Total input|throughput|Mean TTFT|Median TTFT|Mean TPOT|Median TPOT|P99 TTFT|Mean ITL" \
    "$OUT/bench_${backend}_${TAG}.log"
  curl -s "localhost:$PORT/metrics" | grep -E "^sparse_serve|^vllm:request_success_total" \
    > "$OUT/metrics_${backend}_${TAG}.txt"
  grep -E "sparse_serve" "$OUT/metrics_${backend}_${TAG}.txt" | head -12
  grep -E "sparse-serve stats|Traceback|Error" "$log" | tail -4
  kill $server; wait $server 2>/dev/null
done

#!/bin/bash
# The accuracy harness in server mode: `vllm serve` with the sparse backend at its defaults, and
# run_accuracy.py --server-url against it (OpenAI completions API, token-id prompts, greedy),
# on the qwen bundle (Qwen2.5-Coder-0.5B-Instruct):
#
#   bash benchmarks/device/accuracy_server.sh
#
# TASKS ("niah qa"), LENGTHS ("8192 32768"), SAMPLES (20), BACKEND (CUSTOM), PORT (8012),
# GPU_UTIL (0.5), CONCURRENCY (8), START_TIMEOUT_S (300), MODEL, NH (as accuracy_vllm.sh).
# Every SPARSE_* variable of the calling environment (but SPARSE_SERVE_*) is unset, so the
# server runs the defaults of config.py. Writes accuracy_qwen_server_<backend>.json, the server
# log and a /metrics scrape (sparse_serve:*) to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device/setup_env.sh vllm > /tmp/accuracy_server_setup.log 2>&1 \
  || { cat /tmp/accuracy_server_setup.log; exit 1; }
MODEL=${MODEL:-/tmp/bundles/qwen/qwen}
NH=${NH:-/tmp/bundles/qwen/nh}
TASKS=${TASKS:-"niah qa"}
LENGTHS=${LENGTHS:-"8192 32768"}
SAMPLES=${SAMPLES:-20}
BACKEND=${BACKEND:-CUSTOM}
PORT=${PORT:-8012}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-33024}
export PYTHONPATH=$NH${PYTHONPATH:+:$PYTHONPATH}
export VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 TOKENIZERS_PARALLELISM=false
export SPARSE_SERVE_STATS_EVERY_S=${SPARSE_SERVE_STATS_EVERY_S:-30}
for v in $(compgen -e); do
  case $v in SPARSE_SERVE_*) ;; SPARSE_*) echo "unsetting $v=${!v}"; unset "$v";; esac
done
log="$OUT/accuracy_server_$BACKEND.log"
setsid python3 -m vllm.entrypoints.cli.main serve "$MODEL" --attention-backend "$BACKEND" \
  --max-model-len "$MAX_MODEL_LEN" --port "$PORT" --gpu-memory-utilization "${GPU_UTIL:-0.5}" \
  --no-enable-prefix-caching > "$log" 2>&1 &
server=$!
stop() { kill -TERM -- -"$server" 2>/dev/null; sleep 5; kill -KILL -- -"$server" 2>/dev/null; }
up=0
for _ in $(seq 1 "${START_TIMEOUT_S:-300}"); do
  if curl -sf "localhost:$PORT/health" >/dev/null 2>&1; then up=1; break; fi
  kill -0 "$server" 2>/dev/null || break
  grep -q -E "Engine core initialization failed|EngineCore failed" "$log" && break
  sleep 1
done
if [ "$up" != 1 ]; then echo "server did not come up"; tail -30 "$log"; stop; exit 1; fi
python3 benchmarks/accuracy/run_accuracy.py --model "$MODEL" --backend "$BACKEND" \
  --server-url "http://127.0.0.1:$PORT/v1" --served-model-name "$MODEL" --api completions \
  --concurrency "${CONCURRENCY:-8}" --tasks $TASKS --lengths $LENGTHS --samples "$SAMPLES" \
  --max-model-len "$MAX_MODEL_LEN" --no-progress --name "qwen_server_$BACKEND" \
  --method "$BACKEND defaults, vllm serve" --out "$OUT/accuracy_qwen_server_$BACKEND.json"
rc=$?
curl -s "localhost:$PORT/metrics" | grep -E "^sparse_serve|^vllm:request_success_total" \
  > "$OUT/metrics_accuracy_server_$BACKEND.txt"
stop
echo "accuracy_server rc=$rc"
grep -E "sparse-serve (config|stats)" "$log" | tail -3
exit $rc

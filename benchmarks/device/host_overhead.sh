#!/bin/bash
# Host time per eager attention layer (benchmarks/bench_host_overhead.py) on three batches:
# decode rows that read every page beside short prefills (mixed_short), long decode rows
# beside short prefills (mixed_long), and a pure decode batch run eagerly (decode16). With
# OLD_TAR (a `git archive` of an earlier commit: setup.py README.md kernels vllm_sparse
# sglang_sparse) the same batches run on that code too, in the same job. Results: $RES/host/.
#   OLD_TAR=.bundle-cache/old.tar.gz bash benchmarks/device/host_overhead.sh
set -uo pipefail
RES=${RES:-/tmp/res}; mkdir -p "$RES/host"
source benchmarks/device/setup_env.sh vllm > /dev/null || exit 1
cases=("mixed_short --decodes 2 --prefills 14 --context 4096"
       "mixed_long --decodes 2 --prefills 2 --context 32768"
       "decode16 --decodes 16 --prefills 0 --context 4096")
run_all() {  # $1: tag suffix
  local c name
  for c in "${cases[@]}"; do
    name=${c%% *}
    timeout 300 python3 benchmarks/bench_host_overhead.py ${c#* } \
      --out "$RES/host/${name}$1.json" > "$RES/host/${name}$1.log" 2>&1
    echo "${name}$1 rc=$?"
    python3 - "$RES/host/${name}$1.json" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
print("  host us per layer", d["layer_host_us"], "gpu us", d["layer_gpu_us"],
      "build", d["build_host_us"], "syncs", len(d["sync_points"]["sparse_serve"]))
PY
  done
}
run_all ""
if [ -n "${OLD_TAR:-}" ]; then
  rm -rf /tmp/old-src /tmp/sparse-serve-old && mkdir -p /tmp/old-src
  tar xzf "$OLD_TAR" -C /tmp/old-src
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sparse-serve-old \
    /tmp/old-src > /dev/null 2>&1 || { echo "installing $OLD_TAR failed"; exit 1; }
  PYTHONPATH=/tmp/sparse-serve-old:$PYTHONPATH run_all _old
fi

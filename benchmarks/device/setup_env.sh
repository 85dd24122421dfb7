# Source on the GPU machine (device tool) after the bundles are installed:
#   source benchmarks/device/setup_env.sh vllm     (or sglang)
# Puts the engine bundle on PYTHONPATH, installs this repo (entry points) without deps,
# and sets offline mode. See docs/gpu-testing.md.
engine=${1:?usage: source setup_env.sh vllm|sglang}
export PYTHONPATH=/tmp/bundles/$engine${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# Reinstalled only when the sources changed, so that scripts started side by side (one per GPU)
# after a first setup_env do not delete the package under each other.
_src_hash=$(find setup.py kernels vllm_sparse sglang_sparse -name '*.py' -o -name setup.py | sort | xargs cat | sha256sum | cut -c1-16)
if [ "$(cat /tmp/sparse-serve-$engine/.src_hash 2>/dev/null)" != "$_src_hash" ]; then
  rm -rf /tmp/sparse-serve-$engine; python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sparse-serve-$engine . >/tmp/sparse-serve-install.log 2>&1 \
    || { echo "setup_env: installing sparse-serve failed"; return 1; }
  echo "$_src_hash" > /tmp/sparse-serve-$engine/.src_hash
fi
# A --target install puts our packages and their entry points beside the bundle.
export PYTHONPATH=/tmp/sparse-serve-$engine:$PYTHONPATH
python3 - <<'PY'
from importlib.metadata import entry_points
for g in ("vllm.general_plugins", "sglang.srt.plugins"):
    print(g, [e.value for e in entry_points(group=g) if "sparse" in e.value])
PY

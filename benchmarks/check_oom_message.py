"""GPU check: when vLLM's KV cache leaves no room for the page summaries, start-up stops with
sparse-serve's out-of-memory message (the buffer, its size, the settings that make room), not
a bare CUDA error.

    python benchmarks/check_oom_message.py --kv-cache-gib 61 --out oom_check.json

Starts ``LLM(..., attention_backend="CUSTOM", kv_cache_memory_bytes=...)`` on a model shape
with dummy weights, sized so that the KV cache fits and its summaries (about 1/16 of it at
page 16) do not. Writes the exception's type and text and whether it is ours. Exit status 0
only when start-up failed with sparse-serve's message. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import traceback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="examples/model_shapes/llama-3.1-8b")
    ap.add_argument("--kv-cache-gib", type=float, default=61.0)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # the engine core in this process, so that its start-up error reaches this except
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM

    doc = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "model_shape": args.model,
           "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    try:
        import vllm

        doc["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True,
            attention_backend="CUSTOM", max_model_len=args.max_model_len, enforce_eager=True,
            kv_cache_memory_bytes=doc["kv_cache_memory_bytes"])
        doc.update(started=True, ours=False, error=None)
    except Exception as e:  # vLLM re-raises the worker's error, possibly wrapped
        text = "".join(traceback.format_exception(e))
        doc.update(started=False, error_type=type(e).__name__, error=str(e)[-4000:],
                   ours="sparse-serve: out of GPU memory" in text,
                   traceback_tail=text[-6000:])
    print(json.dumps({k: doc.get(k) for k in ("started", "ours", "error_type")}), flush=True)
    if doc.get("error"):
        print(doc["error"][-2000:], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if doc.get("ours") else 1


if __name__ == "__main__":
    sys.exit(main())

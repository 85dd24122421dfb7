"""GPU check: when vLLM's KV cache leaves no room for the page summaries, start-up stops with
sparse-serve's out-of-memory message (the buffer, its size, the settings that make room), not
a bare CUDA error.

    python benchmarks/check_oom_message.py --kv-cache-gib 61 --out oom_check.json
    python benchmarks/check_oom_message.py --gpu-memory-utilization 0.95 --graphs \
        --max-model-len 131072 --out util095.json

Starts ``LLM(..., attention_backend="CUSTOM")`` on a model shape with dummy weights, with the
KV cache given in GiB (``kv_cache_memory_bytes``: sized so that the cache fits and its
summaries, about 1/16 of it at page 16, do not) or by ``gpu_memory_utilization``; eager unless
``--graphs``. When it starts, one short request is served. Writes whether it started and
served, or the exception's type and text and whether it is sparse-serve's message. Exit
status 0 only when start-up failed with that message. Not a test: never collected by pytest.
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
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs (default: eager)")
    ap.add_argument("--backend", default="CUSTOM", help="e.g. FLASH_ATTN, for comparison")
    ap.add_argument("--margin-mib", type=int, default=None,
                    help="override vllm_sparse.backend.START_UP_MARGIN_BYTES (experiments)")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # the engine core in this process, so that its start-up error reaches this except
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM

    if args.margin_mib is not None:  # the engine runs in this process (above)
        import vllm_sparse.backend as sparse_backend

        sparse_backend.START_UP_MARGIN_BYTES = args.margin_mib << 20

    memory = ({"kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
              if args.kv_cache_gib is not None else
              {"gpu_memory_utilization": args.gpu_memory_utilization or 0.9})
    doc = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "model_shape": args.model,
           "backend": args.backend, "margin_mib": args.margin_mib,
           "max_model_len": args.max_model_len,
           "cuda_graphs": args.graphs, **memory}
    try:
        import vllm

        doc["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True,
                  attention_backend=args.backend, max_model_len=args.max_model_len,
                  enforce_eager=not args.graphs, **memory)
        doc.update(started=True, ours=False, error=None)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 4196)))],
                           SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False))
        doc["served_tokens"] = len(out[0].outputs[0].token_ids)
    except Exception as e:  # vLLM re-raises the worker's error, possibly wrapped
        text = "".join(traceback.format_exception(e))
        doc.setdefault("started", False)  # True: it started and failed serving
        doc.update(error_type=type(e).__name__, error=str(e)[-4000:],
                   ours="sparse-serve: out of GPU memory" in text,
                   traceback_tail=text[-6000:])
    print(json.dumps({k: doc.get(k) for k in ("started", "served_tokens", "ours", "error_type")}),
          flush=True)
    if doc.get("error"):
        print(doc["error"][-2000:], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if doc.get("ours") else 1


if __name__ == "__main__":
    sys.exit(main())

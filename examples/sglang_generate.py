"""Generate through SGLang with the sparse-serve backend (GPU machine).

    pip install -e ".[sglang]"
    python examples/sglang_generate.py --model examples/model_shapes/llama-3.1-8b \
        --load-format dummy --input-len 8192

The plugin is found through SGLang's ``sglang.srt.plugins`` entry point; nothing is imported
from sparse-serve here. Prompts are random token ids (no tokenizer needed).
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--backend", default="sparse", help="SGLang --attention-backend")
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--mem-fraction-static", type=float, default=0.8)
    p.add_argument("--log-level", default="warning", help="SGLang log level (its default hides warnings)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import sglang as sgl

    engine = sgl.Engine(
        model_path=args.model,
        load_format=args.load_format,
        skip_tokenizer_init=True,
        attention_backend=args.backend,
        context_length=args.input_len + args.output_len + 16,
        mem_fraction_static=args.mem_fraction_static,
        disable_radix_cache=True,
        log_level=args.log_level,
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 32000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = {"max_new_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0}
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - t0
    rows = []
    for o in outs:
        ids = o["output_ids"]
        rows.append({"output_tokens": len(ids), "first_tokens": ids[:8]})
        print(f"backend {args.backend}: {len(ids)} tokens generated, first ids {ids[:8]}")
    print(f"{args.num_prompts} prompts of {args.input_len} tokens in {elapsed:.2f} s")
    engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "input_len": args.input_len, "elapsed_s": elapsed,
                       "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()

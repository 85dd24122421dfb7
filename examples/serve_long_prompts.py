"""Serve long prompts through vLLM with the sparse-serve backend (GPU machine).

    pip install -e ".[vllm]"
    python examples/serve_long_prompts.py --model examples/model_shapes/llama-3.1-8b \
        --load-format dummy --input-len 32768 --num-prompts 4

With a real checkpoint drop ``--load-format dummy`` and pass ``--model`` a Hugging Face id or
folder. Prompts are random token ids (no tokenizer needed); the script reports time to first
token and per-token decode time, and which attention backend vLLM chose. ``--backend`` switches
between the sparse backend (``CUSTOM``) and any vLLM backend (e.g. ``FLASH_ATTN``) to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto", help="'dummy' for random weights of the model's shape")
    p.add_argument("--backend", default="CUSTOM", help="vLLM attention backend; CUSTOM is sparse-serve")
    p.add_argument("--input-len", type=int, default=32768)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", default=None, help="write the measurements to this file")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        skip_tokenizer_init=True,
        attention_backend=args.backend,
        max_model_len=args.max_model_len or args.input_len + args.output_len + 16,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=False,
    )
    rng = random.Random(0)
    vocab = 32000

    def prompts(n: int) -> list:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(args.input_len)])
                for _ in range(n)]

    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    full = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts(1), one, use_tqdm=False)  # warm-up

    results = []
    for prompt in prompts(args.num_prompts):
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = llm.generate([prompt], full, use_tqdm=False)
        total = time.perf_counter() - t0
        n_out = len(out[0].outputs[0].token_ids)
        tpot = (total - ttft) / max(n_out - 1, 1)
        results.append({"ttft_s": ttft, "tpot_ms": tpot * 1e3, "output_tokens": n_out,
                        "first_tokens": list(out[0].outputs[0].token_ids[:8])})
        print(f"input {args.input_len} tokens: TTFT {ttft:.3f} s, TPOT {tpot * 1e3:.2f} ms, "
              f"{n_out} tokens generated, first ids {results[-1]['first_tokens']}")
    summary = {"backend": args.backend, "model": args.model, "input_len": args.input_len,
               "output_len": args.output_len, "runs": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

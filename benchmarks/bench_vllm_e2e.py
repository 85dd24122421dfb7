"""End-to-end vLLM timing: TTFT and TPOT per prompt length, one backend per process.

    python benchmarks/bench_vllm_e2e.py --backend CUSTOM --lens 4096 32768 126976 --out x.json
    python benchmarks/bench_vllm_e2e.py --backend FLASH_ATTN --lens 4096 32768 126976 --out y.json

Random weights of a real model's shape (``--load-format dummy``), random token-id prompts,
batch 1; prefix caching is on but every timed batch-1 prompt is new (random tokens share no
block), and ``--decode-batch`` uses it to time decode steps without prefill in between. TTFT = time of a 1-token generate;
TPOT = (time of a ``--output-len``-token generate of another prompt of the same length - TTFT)
/ (output_len - 1), the definition of
../shared/device/README.md. Run each backend in its own process on the same machine and compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="examples/model_shapes/llama-3.1-8b")
    p.add_argument("--backend", required=True)
    p.add_argument("--lens", type=int, nargs="+", default=[4096, 32768, 126976])
    p.add_argument("--output-len", type=int, default=257)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--decode-batch", type=int, default=0,
                   help="also time a batch of this many --decode-len prompts (decode throughput)")
    p.add_argument("--decode-len", type=int, default=32768)
    p.add_argument("--decode-repeats", type=int, default=3,
                   help="timed (1-token, output-len) pairs of the batch; the median counts")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's max_model_len (default: the longest prompt + output + 8); "
                        "e.g. 131072 to time short prompts in a long-context engine")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--profile-dir", default=None,
                   help="with --decode-batch: after the timed decode, a torch profile (vLLM's "
                        "profiler_config) of --profile-steps decode steps of the batch, from "
                        "the prefix cache, written under this folder by the engine's worker "
                        "(summarize with benchmarks/profile_summary.py)")
    p.add_argument("--profile-steps", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # The engine process writes its sparse-serve counters here (see engine_stats below).
    os.environ.setdefault("SPARSE_SERVE_METRICS_FILE", f"/tmp/sparse_serve_e2e_{os.getpid()}.json")
    max_len = max(args.lens + [args.decode_len if args.decode_batch else 0]) + args.output_len + 8
    if args.max_model_len:
        if args.max_model_len < max_len:
            sys.exit(f"--max-model-len {args.max_model_len} < {max_len} (prompt + output)")
        max_len = args.max_model_len
    engine_extra = {}
    if args.tp > 1 and os.environ.get("TP_FUSED_ALLREDUCE", "0") != "1":
        # On hosts without NVLink multicast, vLLM 0.26's TP all-reduce + RMSNorm fusion
        # (FlashInfer "mnnvl" workspace) faults; see benchmarks/device/serve_bench.sh.
        os.environ.setdefault("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm")
        engine_extra["compilation_config"] = {"pass_config": {"fuse_allreduce_rms": False}}
    if args.profile_dir:
        # kernels only: no Python stacks or shapes (small traces, little overhead)
        engine_extra["profiler_config"] = {
            "profiler": "torch", "torch_profiler_dir": os.path.abspath(args.profile_dir),
            "torch_profiler_with_stack": False, "torch_profiler_record_shapes": False,
            "ignore_frontend": True}
    t_start = time.perf_counter()
    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True,
              attention_backend=args.backend, max_model_len=max_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=True,
              max_num_batched_tokens=16384, tensor_parallel_size=args.tp, **engine_extra,
              # per-request engine timestamps (RequestOutput.metrics): the in-run decode step
              disable_log_stats=False,
              **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}))
    startup_s = time.perf_counter() - t_start
    rng = random.Random(0)

    def prompt(n: int):
        return TokensPrompt(prompt_token_ids=[rng.randrange(100, 32000) for _ in range(n)])

    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False, temperature=0.0)
    many = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False,
                          temperature=0.0)
    llm.generate([prompt(1024)], many, use_tqdm=False)  # warm-up
    def in_run_step_ms(outs) -> float | None:
        """Median over the requests of (last token time - first token time) / (tokens - 1),
        from vLLM's per-request stats; None where this vLLM does not give them."""
        per = []
        for o in outs:
            st, n = getattr(o, "metrics", None), len(o.outputs[0].token_ids)
            first, last = getattr(st, "first_token_ts", 0.0), getattr(st, "last_token_ts", 0.0)
            if n > 1 and first and last > first:
                per.append((last - first) / (n - 1) * 1e3)
        return statistics.median(per) if per else None

    def engine_stats():
        """Cumulative sparse-serve counters of the engine process (CUSTOM only), through the
        metrics file it writes (SPARSE_SERVE_METRICS_EVERY_S): a short dense request after
        the interval makes it write a fresh one."""
        if args.backend != "CUSTOM":
            return None
        from vllm_sparse import metrics

        time.sleep(metrics.WRITE_EVERY_S + 0.2)
        llm.generate([prompt(64)], one, use_tqdm=False)
        return metrics.read_snapshot()

    def delta(a, b):
        if a is None or b is None:
            return None
        from vllm_sparse.metrics import fractions_from_sums

        d = [y - x for x, y in zip(a["device_sums"], b["device_sums"])]
        return {**fractions_from_sums(d),
                "prefill_chunks_sparse": b["prefill_chunks_sparse"] - a["prefill_chunks_sparse"],
                "prefill_chunks_dense_fallback": b.get("prefill_chunks_dense_fallback", 0)
                - a.get("prefill_chunks_dense_fallback", 0)}

    rows = []
    for n in args.lens:
        # Warm up this length: the first long prompt JIT-compiles kernels for its shapes.
        llm.generate([prompt(n)], many, use_tqdm=False)
        ttfts, tpots = [], []
        first = None
        before = engine_stats()
        for _ in range(args.repeats):
            # Two fresh prompts of the same length: random tokens share no cached block, so
            # prefix caching (on, for the batch test below) never shortens these prefills.
            t0 = time.perf_counter()
            llm.generate([prompt(n)], one, use_tqdm=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = llm.generate([prompt(n)], many, use_tqdm=False)
            total = time.perf_counter() - t0
            ids = list(out[0].outputs[0].token_ids)
            first = first or ids[:16]
            ttfts.append(ttft)
            tpots.append((total - ttft) / (len(ids) - 1))
        rows.append({"input_len": n, "ttft_s": min(ttfts), "tpot_ms": min(tpots) * 1e3,
                     "ttft_all": ttfts, "tpot_all_ms": [t * 1e3 for t in tpots],
                     "first_output_ids": first, "sparse_stats": delta(before, engine_stats())})
        print(f"{args.backend} len {n}: TTFT {min(ttfts):.3f} s  TPOT {min(tpots) * 1e3:.2f} ms"
              f"  sparse stats {rows[-1]['sparse_stats']}", flush=True)
    batch_row = None
    if args.decode_batch:
        # Decode throughput of a batch in steady state. The batch is prefilled once (1 token
        # each: the prompts' KV pages, and their page summaries, stay in the prefix cache);
        # then the same prompts run again from the cache, once for 1 token (t_cached: the
        # last-block recompute and scheduling) and once for output_len tokens: the
        # difference is output_len - 1 decode steps of the whole batch, with no prefill
        # chunk interleaved (chunked prefill would otherwise mix both phases). That pair runs
        # --decode-repeats times and the median difference counts: one t_cached varied by
        # up to 35 ms between engines (2-3% of a 128-step difference; session 16).
        b, n = args.decode_batch, args.decode_len
        llm.generate([prompt(n) for _ in range(b)], many, use_tqdm=False)  # warm-up
        before = engine_stats()
        prs = [prompt(n) for _ in range(b)]
        t0 = time.perf_counter()
        llm.generate(prs, one, use_tqdm=False)
        t_prefill = time.perf_counter() - t0
        cached, totals, step_ms, step_ms_in_run = [], [], [], []
        for _ in range(max(1, args.decode_repeats)):
            t0 = time.perf_counter()
            llm.generate(prs, one, use_tqdm=False)
            cached.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            outs = llm.generate(prs, many, use_tqdm=False)
            totals.append(time.perf_counter() - t0)
            steps = min(len(o.outputs[0].token_ids) for o in outs) - 1
            step_ms.append((totals[-1] - cached[-1]) / steps * 1e3)
            in_run = in_run_step_ms(outs)
            if in_run is not None:
                step_ms_in_run.append(in_run)
        step_diff = statistics.median(step_ms)
        # The step from each request's own first and last token times (engine-core
        # timestamps), within one run: the cached pass's time is not subtracted, so the
        # host time of that (eager) pass and its noise stay out of it. The difference of
        # the two runs' wall times is kept beside it (step_ms_difference).
        step = statistics.median(step_ms_in_run) if step_ms_in_run else step_diff
        # The batch must fit in the KV cache, else the "cached" passes re-prefill evicted
        # prompts and the difference is no decode step (16 x 32K on an H100 with an 8B model:
        # 526K tokens against 412K; session 18). A hit costs a fraction of the prefill.
        cache_hits = statistics.median(cached) < 0.25 * t_prefill
        if not cache_hits:
            print(f"WARNING: the {b} x {n} batch missed the prefix cache (1-token pass "
                  f"{statistics.median(cached):.2f} s against a {t_prefill:.2f} s prefill): "
                  f"it does not fit in the KV cache, so step_ms is not a decode step; use a "
                  f"smaller batch", flush=True)
        batch_row = {"batch": b, "input_len": n, "prefill_s": t_prefill,
                     "cache_hits": cache_hits,
                     "cached_one_token_s": statistics.median(cached),
                     "total_from_cache_s": statistics.median(totals),
                     "cached_one_token_s_all": cached, "total_from_cache_s_all": totals,
                     "decode_steps": steps, "step_ms": step,
                     "step_ms_source": "in_run" if step_ms_in_run else "difference",
                     "step_ms_in_run_all": step_ms_in_run, "step_ms_difference": step_diff,
                     "step_ms_all": step_ms,
                     "decode_tok_per_s": b * 1e3 / step,
                     "sparse_stats": delta(before, engine_stats())}
        if args.profile_dir:
            # The same batch from the prefix cache again: the last block's recompute, then
            # profile_steps - 1 decode steps (the steps of every request run in one batch).
            prof = SamplingParams(max_tokens=args.profile_steps, ignore_eos=True,
                                  detokenize=False, temperature=0.0)
            llm.generate(prs, one, use_tqdm=False)
            llm.start_profile()
            llm.generate(prs, prof, use_tqdm=False)
            llm.stop_profile()
            batch_row["profile"] = {"dir": args.profile_dir, "steps": args.profile_steps}
        print(f"{args.backend} batch {b} x {n}: prefill {t_prefill:.2f} s, decode step "
              f"{batch_row['step_ms']:.2f} ms, {batch_row['decode_tok_per_s']:.0f} tok/s"
              f"  sparse stats {batch_row['sparse_stats']}",
              flush=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("SPARSE_")}
    result = {
        "command": " ".join([sys.executable] + sys.argv), "date": datetime.datetime.now().isoformat(),
        "device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
        "backend": args.backend, "tensor_parallel_size": args.tp, "model_shape": args.model, "weights": "dummy", "batch": 1,
        "output_len": args.output_len, "sparse_env": env, "startup_s": startup_s, "rows": rows,
        "decode_batch": batch_row,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

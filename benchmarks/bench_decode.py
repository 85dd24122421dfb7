"""Decode-side benchmark: Quest top-k sparse decode vs dense paged decode (FA3), on a GPU.

Llama-3.1-8B attention shapes by default (32 query heads, 8 KV heads, head dim 128, bf16,
page 16); one attention layer, one decode token per sequence, every sequence at the full
context. Times, per (context, batch, budget):

  * summary   -- ``update_page_summaries`` for this step's token (incremental);
  * select    -- ``select_pages``: Triton scoring kernel + ``torch.topk`` + sort;
  * attention -- ``sparse_decode`` over the selected pages;
  * sparse    -- the three together (one CUDA graph);
  * dense     -- FA3 paged decode (``vllm.vllm_flash_attn.flash_attn_varlen_func``,
                 ``fa_version=3``) and our kernel in dense mode.

Each timed call is a CUDA-graph replay (``--no-graphs``: eager launches) preceded by an L2
flush, timed with CUDA events; the median is reported. The run also checks our dense mode
against FA3 (max abs diff) and writes one JSON (``--out``, default
``benchmarks/results/decode_<date>.json``).

Usage (on the GPU box, vLLM 0.26 installed)::

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --contexts 32768 --batches 1 --budgets 2048

Not a test: never collected by pytest, never run in CI.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton

from sparse_kernels.page_select import select_pages
from sparse_kernels.page_summary import build_page_summaries, update_page_summaries
from sparse_kernels.sparse_decode import DecodeWorkspace, default_num_splits, sparse_decode


def _load_fa3():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - report any import failure
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_varlen_func, None


class _Timer:
    """Median time of ``fn`` in ms: CUDA-graph replay (or eager), L2 flushed before each."""

    def __init__(self, graphs: bool, iters: int, warmup: int):
        self.graphs, self.iters, self.warmup = graphs, iters, warmup
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")

    def __call__(self, fn) -> float:
        run = fn
        if self.graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        for _ in range(self.warmup):
            run()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for i in range(self.iters):
            self.flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
        return times[len(times) // 2]


def run_config(args, ctx: int, batch: int, budgets: list[int], fa3, timer: _Timer) -> list[dict]:
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    page, hq, hkv, d = args.page_size, args.num_q_heads, args.num_kv_heads, args.head_dim
    scale = 1.0 / math.sqrt(d)
    pages_per_seq = triton.cdiv(ctx, page)
    num_blocks = batch * pages_per_seq + 1
    g = torch.Generator(device=dev).manual_seed(0)

    # FlashAttention layout [2, num_blocks, page, H, D]: K and V are plain 4-D views.
    kv = torch.empty((2, num_blocks, page, hkv, d), dtype=dtype, device=dev)
    kv.normal_(generator=g)
    k_cache, v_cache = kv[0], kv[1]
    perm = torch.randperm(num_blocks - 1, generator=g, device=dev).to(torch.int32) + 1
    block_table = perm[: batch * pages_per_seq].view(batch, pages_per_seq).contiguous()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn((batch, hq, d), dtype=dtype, device=dev, generator=g)
    out_fa = torch.empty_like(q)
    out_dense = torch.empty_like(q)
    out_sparse = torch.empty_like(q)

    summaries = torch.empty((num_blocks, 2, hkv, d), dtype=dtype, device=dev)
    build_page_summaries(k_cache, summaries, block_table, seq_lens)

    max_splits = 64
    ws = DecodeWorkspace(batch, hq, d, max_splits, dev)

    def dense_ours():
        sparse_decode(q, k_cache, v_cache, block_table, seq_lens, None, out=out_dense,
                      scale=scale, workspace=ws)

    def dense_fa3():
        fa3(q, k_cache, v_cache, max_seqlen_q=1, cu_seqlens_q=qsl, max_seqlen_k=ctx,
            seqused_k=seq_lens, block_table=block_table, causal=True, softmax_scale=scale,
            out=out_fa, fa_version=3)

    dense_ours()
    fa3_ms = fa3_diff = None
    if fa3 is not None:
        dense_fa3()
        torch.cuda.synchronize()
        fa3_diff = (out_dense.float() - out_fa.float()).abs().max().item()
        fa3_ms = timer(dense_fa3)
    dense_ours_ms = timer(dense_ours)

    rows = []
    for budget in budgets:
        k_sel = budget // page
        sink = triton.cdiv(args.sink_tokens, page)
        local = triton.cdiv(args.local_tokens, page)
        sel_box = {}

        def summary():
            update_page_summaries(k_cache, summaries, block_table, qsl, seq_lens, batch)

        def select():
            sel_box["sel"] = select_pages(q, summaries, block_table, seq_lens, page, k_sel,
                                          sink, local)

        select()
        sel_static = sel_box["sel"].clone()

        def attention():
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_static,
                          out=out_sparse, scale=scale, workspace=ws)

        def pipeline():
            summary()
            sel = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local)
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel, out=out_sparse,
                          scale=scale, workspace=ws)

        t_sum, t_sel, t_att, t_all = timer(summary), timer(select), timer(attention), timer(pipeline)
        base = fa3_ms if fa3_ms is not None else dense_ours_ms
        row = {
            "context": ctx,
            "batch": batch,
            "budget": budget,
            "num_select_pages": k_sel,
            "sink_pages": sink,
            "local_pages": local,
            "num_splits_sparse": default_num_splits(batch, hkv, k_sel * page, dev),
            "num_splits_dense": default_num_splits(batch, hkv, pages_per_seq * page, dev),
            "dense_fa3_ms": fa3_ms,
            "dense_ours_ms": dense_ours_ms,
            "summary_ms": t_sum,
            "select_ms": t_sel,
            "attention_ms": t_att,
            "sparse_total_ms": t_all,
            "sparse_parts_sum_ms": t_sum + t_sel + t_att,
            "speedup_vs": "fa3" if fa3_ms is not None else "dense_ours",
            "speedup": base / t_all,
            "attention_only_speedup": base / t_att,
            "ours_dense_vs_fa3_max_abs_diff": fa3_diff,
        }
        rows.append(row)
        print(_fmt_row(row), flush=True)
    del kv, summaries
    torch.cuda.empty_cache()
    return rows


_COLS = [("context", 7), ("batch", 5), ("budget", 6), ("dense_fa3_ms", 9),
         ("dense_ours_ms", 9), ("summary_ms", 9), ("select_ms", 9), ("attention_ms", 9),
         ("sparse_total_ms", 9), ("speedup", 7), ("ours_dense_vs_fa3_max_abs_diff", 9)]
_HEAD = ["ctx", "batch", "budget", "fa3 ms", "ours-d ms", "summ ms", "select ms", "attn ms",
         "sparse ms", "speedup", "|d-fa3|"]


def _fmt(v, w):
    if v is None:
        return "-".rjust(w)
    if isinstance(v, float):
        return (f"{v:.2e}" if v < 1e-2 and v != 0 else f"{v:.4f}").rjust(w)
    return str(v).rjust(w)


def _fmt_row(row):
    return " ".join(_fmt(row[c], w) for c, w in _COLS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--local-tokens", type=int, default=512)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches")
    p.add_argument("--require-fa3", action="store_true", help="fail if FA3 cannot be imported")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    fa3, why = _load_fa3()
    if fa3 is None:
        msg = f"FA3 unavailable ({why}); comparing against our dense kernel only"
        if args.require_fa3:
            sys.exit(msg)
        print("WARNING:", msg, flush=True)
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001
        vllm_version = None

    timer = _Timer(not args.no_graphs, args.iters, args.warmup)
    print(" ".join(h.rjust(w) for h, (_, w) in zip(_HEAD, _COLS)), flush=True)
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            rows += run_config(args, ctx, batch, args.budgets, fa3, timer)

    now = _dt.datetime.now()
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": now.isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "vllm": vllm_version,
        "fa3": fa3 is not None,
        "cuda_graphs": not args.no_graphs,
        "shapes": {"num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads,
                   "head_dim": args.head_dim, "page_size": args.page_size, "dtype": args.dtype,
                   "sink_tokens": args.sink_tokens, "local_tokens": args.local_tokens},
        "rows": rows,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"decode_{now:%Y%m%d}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

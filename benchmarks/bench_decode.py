"""Decode-side benchmark: Quest top-k sparse decode vs dense paged decode (FA3), on a GPU.

Llama-3.1-8B attention shapes by default (32 query heads, 8 KV heads, head dim 128, bf16,
page 16); one attention layer, one decode token per sequence, every sequence at the full
context. Times, per (context, batch, budget):

  * summary   -- ``update_page_summaries`` for this step's token (incremental);
  * select    -- ``select_pages``: page-chunk scoring kernel + radix top-k (default
    ``topk_method="auto"``: two-stage for small grids and long rows, else single-stage);
    ``select_single`` / ``select_two_stage``: the same with the top-k path forced (A/B);
    ``topk_single`` / ``topk_two_stage``: the top-k alone, on the scores of a select call;
    ``select_fused``: ``method="fused"`` (one launch, the last program of a row selects);
    ``select_fused_summary``: ``select_pages(k_cache=...)``, the summary update folded in;
  * attention -- ``sparse_decode`` over the selected pages;
  * sparse    -- summary + select + attention (one CUDA graph); ``sparse_fused``: select with
    the fused summary update + attention (two launches, three with the split merge);
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

from gpu_bench import add_shape_args, capture_graph, load_fa3, median_ms, vllm_version
from sparse_kernels import page_select
from sparse_kernels.page_select import (
    SelectWorkspace,
    default_chunk_pages,
    resolve_topk_method,
    select_pages,
    topk_pages,
    two_stage_plan,
)
from sparse_kernels.page_summary import build_page_summaries, update_page_summaries
from sparse_kernels.sparse_decode import (
    DecodeWorkspace,
    default_block_n,
    default_num_splits,
    sparse_decode,
)


class _Timer:
    """Median time of ``fn`` in ms: CUDA-graph replay (or eager), L2 flushed before each."""

    def __init__(self, graphs: bool, iters: int, warmup: int):
        self.graphs, self.iters, self.warmup = graphs, iters, warmup
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")

    def __call__(self, fn) -> float:
        run = capture_graph(fn) if self.graphs else fn
        return median_ms(run, self.iters, self.warmup, self.flush)


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
    # candidates: room for a forced two-stage top-k at any batch (a default plan keeps at most
    # pages_per_seq per row), so no buffer grows while graphs are captured
    sws = SelectWorkspace(batch, hkv, pages_per_seq, dev, candidates=batch * hkv * pages_per_seq)
    sws_f = SelectWorkspace(batch, hkv, pages_per_seq, dev)  # method="fused" (counters)

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
                                          sink, local, workspace=sws)

        def select_single():
            select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                         workspace=sws, topk_method="single")

        def select_two_stage():
            select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                         workspace=sws, topk_method="two_stage")

        def select_fused():
            select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                         workspace=sws_f, method="fused")

        def select_fused_summary():
            select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                         workspace=sws, k_cache=k_cache)

        select()
        sel_static = sel_box["sel"].clone()
        topk_path = resolve_topk_method("auto", batch, hkv, pages_per_seq, k_sel, dev)
        plan = two_stage_plan(batch, hkv, pages_per_seq, k_sel, dev)
        # the top-k alone, on the scores select() left in the workspace (static from here on)
        sc_view = sws.views(batch, hkv, pages_per_seq)[0]
        topk_out = torch.empty_like(sel_static)

        def topk_single():
            topk_pages(sc_view, seq_lens, page, k_sel, out=topk_out, topk_method="single")

        def topk_two_stage():
            topk_pages(sc_view, seq_lens, page, k_sel, out=topk_out, topk_method="two_stage",
                       workspace=sws)

        check_1 = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                               topk_method="single")
        check_2 = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                               topk_method="two_stage")
        # must hold: the two top-k paths are exact (bit-identical, ties included)
        sel_two_stage_matches_single = bool(torch.equal(check_1, check_2))
        check = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                             method="fused")
        check_t = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                               method="torch")
        sel_matches_fused = bool(torch.equal(check, sel_static))
        # informational: torch.topk may break exact score ties differently
        sel_matches_torch = bool(torch.equal(check_t, sel_static))

        def attention():
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_static,
                          out=out_sparse, scale=scale, workspace=ws)

        def pipeline():
            summary()
            sel = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                               workspace=sws)
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel, out=out_sparse,
                          scale=scale, workspace=ws)

        def pipeline_fused():
            sel = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                               workspace=sws, k_cache=k_cache)
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel, out=out_sparse,
                          scale=scale, workspace=ws)

        t_sum, t_sel, t_att, t_all = timer(summary), timer(select), timer(attention), timer(pipeline)
        t_sel_fused, t_sel_fs = timer(select_fused), timer(select_fused_summary)
        t_sel_1, t_sel_2 = timer(select_single), timer(select_two_stage)
        t_topk_1, t_topk_2 = timer(topk_single), timer(topk_two_stage)
        t_fused = timer(pipeline_fused)
        sweep = None
        if args.sweep and batch <= args.sweep_max_batch:
            sweep = {"select": {}, "select_two_stage": {}, "select_fused": {}, "attention": {}}
            best_sel = (t_sel, {})

            def try_select(table: str, label: str, kw: dict) -> None:
                nonlocal best_sel
                t = timer(lambda: select_pages(q, summaries, block_table, seq_lens, page, k_sel,
                                               sink, local, workspace=sws, **kw))
                sweep[table][label] = t
                if t < best_sel[0]:
                    best_sel = (t, kw)

            for chunk in (64, 128, 256):
                for nw in (4, 8):
                    for tw in (8, 16):
                        try_select("select", f"chunk{chunk}_w{nw}_topkw{tw}",
                                   dict(chunk_pages=chunk, num_warps=nw, topk_warps=tw,
                                        topk_method="single"))
            # two-stage top-k: segment size x stage-1 warps x stage-2 warps (default scoring)
            for seg in (256, 512, 1024, 2048, 4096):
                if seg < 2 * k_sel or seg >= pages_per_seq:
                    continue
                for w1 in (4, 8):
                    for w2 in (4, 8, 16):
                        try_select("select_two_stage", f"seg{seg}_w{w1}_topkw{w2}",
                                   dict(topk_method="two_stage", segment_pages=seg,
                                        stage1_warps=w1, topk_warps=w2))
            for chunk in (128, 256):
                sweep["select_fused"][f"chunk{chunk}_w16"] = timer(
                    lambda c=chunk: select_pages(
                        q, summaries, block_table, seq_lens, page, k_sel, sink, local,
                        workspace=sws_f, method="fused", chunk_pages=c, num_warps=16))
            best_att = (t_att, {})
            for splits, bn in ((16, 64), (33, 64), (33, 32), (48, 32), (64, 32)):
                kw = dict(num_splits=splits, block_n=bn)
                t = timer(lambda kw=kw: sparse_decode(
                    q, k_cache, v_cache, block_table, seq_lens, sel_static, out=out_sparse,
                    scale=scale, workspace=ws, **kw))
                sweep["attention"][f"s{splits}_bn{bn}"] = t
                if t < best_att[0]:
                    best_att = (t, kw)

            def pipeline_best():
                sel = select_pages(q, summaries, block_table, seq_lens, page, k_sel, sink,
                                   local, workspace=sws, k_cache=k_cache, **best_sel[1])
                sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel,
                              out=out_sparse, scale=scale, workspace=ws, **best_att[1])

            sweep["best_select"] = best_sel[1]
            sweep["best_attention"] = best_att[1]
            sweep["pipeline_fused_best_ms"] = timer(pipeline_best)
            base_ = fa3_ms if fa3_ms is not None else dense_ours_ms
            sweep["speedup_fused_best"] = base_ / sweep["pipeline_fused_best_ms"]
            print("   sweep:", json.dumps(sweep), flush=True)
        base = fa3_ms if fa3_ms is not None else dense_ours_ms
        row = {
            "context": ctx,
            "batch": batch,
            "budget": budget,
            "num_select_pages": k_sel,
            "sink_pages": sink,
            "local_pages": local,
            "block_n": default_block_n(batch, hkv, dev),
            "num_splits_sparse": default_num_splits(batch, hkv, k_sel * page, dev,
                                                    default_block_n(batch, hkv, dev)),
            "num_splits_dense": default_num_splits(batch, hkv, pages_per_seq * page, dev,
                                                   default_block_n(batch, hkv, dev)),
            "dense_fa3_ms": fa3_ms,
            "dense_ours_ms": dense_ours_ms,
            "select_chunk_pages": default_chunk_pages(batch, hkv, pages_per_seq, dev),
            "select_num_warps": page_select.SCORE_NUM_WARPS,
            "topk_num_warps": page_select.default_topk_warps(pages_per_seq),
            "select_topk_method": topk_path,
            "two_stage_plan": (None if plan is None
                               else {"segment_pages": plan[0], "num_segments": plan[1]}),
            "summary_ms": t_sum,
            "select_ms": t_sel,
            "select_single_ms": t_sel_1,
            "select_two_stage_ms": t_sel_2,
            "topk_single_ms": t_topk_1,
            "topk_two_stage_ms": t_topk_2,
            "select_two_stage_matches_single": sel_two_stage_matches_single,
            "select_fused_ms": t_sel_fused,
            "select_fused_summary_ms": t_sel_fs,
            "select_matches_fused": sel_matches_fused,
            "select_matches_torch_topk": sel_matches_torch,
            "attention_ms": t_att,
            "sparse_total_ms": t_all,
            "sparse_parts_sum_ms": t_sum + t_sel + t_att,
            "speedup_vs": "fa3" if fa3_ms is not None else "dense_ours",
            "sparse_fused_total_ms": t_fused,
            "speedup": base / t_all,
            "speedup_fused": base / t_fused,
            "attention_only_speedup": base / t_att,
            "ours_dense_vs_fa3_max_abs_diff": fa3_diff,
            "sweep": sweep,
        }
        rows.append(row)
        print(_fmt_row(row), flush=True)
    del kv, summaries
    torch.cuda.empty_cache()
    return rows


_COLS = [("context", 7), ("batch", 5), ("budget", 6), ("dense_fa3_ms", 9),
         ("dense_ours_ms", 9), ("summary_ms", 9), ("select_ms", 9), ("select_single_ms", 9),
         ("select_two_stage_ms", 9), ("topk_single_ms", 9), ("topk_two_stage_ms", 9),
         ("select_fused_ms", 9),
         ("select_fused_summary_ms", 9), ("attention_ms", 9), ("sparse_total_ms", 9),
         ("sparse_fused_total_ms", 9), ("speedup", 7), ("speedup_fused", 7),
         ("ours_dense_vs_fa3_max_abs_diff", 9)]
_HEAD = ["ctx", "batch", "budget", "fa3 ms", "ours-d ms", "summ ms", "select ms", "sel-1st",
         "sel-2st", "topk-1st", "topk-2st", "sel-1L",
         "sel+summ", "attn ms", "sparse ms", "fused ms", "speedup", "sp-fused", "|d-fa3|"]


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
    p.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192])
    add_shape_args(p)
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--local-tokens", type=int, default=512)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches")
    p.add_argument("--require-fa3", action="store_true", help="fail if FA3 cannot be imported")
    p.add_argument("--sweep", action="store_true",
                   help="also time select chunk sizes and attention split counts")
    p.add_argument("--sweep-max-batch", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    fa3, why = load_fa3()
    if fa3 is None:
        msg = f"FA3 unavailable ({why}); comparing against our dense kernel only"
        if args.require_fa3:
            sys.exit(msg)
        print("WARNING:", msg, flush=True)

    timer = _Timer(not args.no_graphs, args.iters, args.warmup)
    print(" ".join(h.rjust(w) for h, (_, w) in zip(_HEAD, _COLS)), flush=True)
    now = _dt.datetime.now()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"decode_{now:%Y%m%d}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            rows += run_config(args, ctx, batch, args.budgets, fa3, timer)
            result = {
                "command": " ".join([sys.executable, *sys.argv]),
                "date": now.isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "vllm": vllm_version(),
                "fa3": fa3 is not None,
                "cuda_graphs": not args.no_graphs,
                "shapes": {"num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads,
                           "head_dim": args.head_dim, "page_size": args.page_size,
                           "dtype": args.dtype, "sink_tokens": args.sink_tokens,
                           "local_tokens": args.local_tokens},
                "rows": rows,
            }
            with open(out, "w") as f:  # rewritten after every config: partial runs keep data
                json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

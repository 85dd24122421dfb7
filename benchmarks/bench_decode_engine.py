"""Decode step as the vLLM backend runs it, layer after layer in one CUDA graph, against FA3.

``bench_decode.py`` times each piece of the sparse decode (summary, selection, attention) in a
graph of its own, over block tables as wide as the context. An engine differs in two ways that
matter for short contexts: its block table is as wide as ``max_model_len`` (8256 pages for a
128K engine at page 16), whatever the request's length, and a decode step replays all layers'
launches back to back in one graph, so per-launch costs (programs that only exit, the split
merge) add up. This benchmark reproduces both: ``--layers`` decode calls, each over its own
pages of one KV pool, captured in one graph, with block tables ``--table-pages`` wide; it
reports microseconds per layer for

  * ``fa3``         -- ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (what FLASH_ATTN runs);
  * ``dense``       -- :func:`sparse_kernels.pipeline.decode_attention` with method "dense";
  * ``topk_<plan>`` -- the same with method "topk" and ``decode_select=<plan>``, as the backend
    calls it (since session 12 the decode token's page summary is refreshed by the KV write,
    not in the scoring launch: ``fuse_summary=False``; the write is timed apart, below): rows
    that read every page in a dense-mode launch of ours beside the selection
    (``decode_overlap``, on :func:`~sparse_kernels.pipeline.decode_side_stream`;
    ``decode_dense_rows="triton"``);
  * ``topk_auto_fa3rows`` -- those rows attended by FA3 instead (``decode_dense_rows="engine"``),
    before the other rows' launch, with FA3's own split heuristic sized by the bound on those
    rows (the vLLM backend until session 10);
  * ``topk_auto_fa3rows_aot`` -- the same with what the backend passes since session 10
    (:mod:`vllm_sparse.full_rows_fa`): the rows' lengths built once per step and FA3's
    ahead-of-time schedule from them (``get_scheduler_metadata``, ``num_splits`` 32), as
    vLLM's FLASH_ATTN builder makes it under full CUDA graphs;
  * ``topk_auto_fa3rows_masked`` -- FA3 for those rows called with ``seqused_q`` (1 for a
    full row, 0 for the others: :func:`vllm_sparse.full_rows_fa.fa3_decode_rows`), so that it
    writes only those rows and runs beside the selection and the other rows' attention
    instead of before them (session 13); the same ahead-of-time schedule, with ``seqused_q``;
  * ``topk_auto_serial`` -- ``decode_overlap`` off: the selection, then one decode launch
    over every row (the path before session 9);
  * ``topk_auto_kept`` -- a step in which every row keeps an earlier step's selection
    (selection reuse, ``SPARSE_SELECTION_REUSE``): no scoring, no top-k;

the KV write of the step's tokens, ``kv_write_vllm`` (vLLM's ``reshape_and_cache_flash``, what
FLASH_ATTN runs) and ``kv_write_sparse`` (:func:`sparse_kernels.kv_write.write_kv_and_summaries`,
what a top-k layer of the backend runs: the write and the decode pages' summaries), whose
difference a top-k step pays beyond its attention; and, with ``--variants``, the same under a
changed launch rule (split merge inside the decode
kernel; a tile of 64 tokens), to find where the time goes. Sequences of at most
``2 * budget`` tokens are dense rows of the top-k plans (``decode_min_seq_len`` default), so at
4K this measures what a short request pays for the sparse backend.

Usage (GPU, vLLM 0.26 installed)::

    python benchmarks/bench_decode_engine.py --contexts 4096 131072 --batches 1 16 \
        --out benchmarks/results/decode_engine_<date>.json

Not a test: never collected by pytest, never run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import torch
import triton

from gpu_bench import add_shape_args, capture_graph, load_fa3, median_ms, vllm_version
from sparse_kernels import balanced_decode as bd
from sparse_kernels import page_select as ps
from sparse_kernels import pipeline as pl
from sparse_kernels import sparse_decode as sd
from sparse_kernels.config import DECODE_SELECTS, SparseConfig
from sparse_kernels.kv_write import write_kv_and_summaries
from sparse_kernels.page_select import SelectWorkspace
from sparse_kernels.page_summary import build_page_summaries
from sparse_kernels.pipeline import (
    decode_attention,
    decode_budget_pages,
    decode_dense_pages,
    decode_select_pages,
    decode_side_stream,
    use_engine_dense_rows,
)
from sparse_kernels.sparse_decode import DecodeWorkspace, _interpreting


def _graph_time_us(fn, iters: int, flush: torch.Tensor) -> float:
    """Median microseconds of one replay of a graph of ``fn`` (L2 flushed before each); on a
    CPU (``TRITON_INTERPRET=1`` smoke run) one eager call, timed on the host."""
    if flush.device.type == "cpu":
        import time

        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    return 1000.0 * median_ms(capture_graph(fn), iters, 3, flush)


@dataclasses.dataclass
class _Layer:
    block_table: torch.Tensor
    summaries: torch.Tensor


class _Variant:
    """A changed launch rule for the duration of a timing (module constants of the kernels)."""

    def __init__(self, name: str, module, **consts):
        self.name, self.module, self.consts, self.saved = name, module, consts, {}

    def __enter__(self):
        if self.module == _CFG:  # applied to the plan's config (variant_config)
            return
        if isinstance(self.module, str):  # imported on use (vLLM's modules)
            import importlib

            self.module = importlib.import_module(self.module)
        for k, v in self.consts.items():
            self.saved[k] = getattr(self.module, k)
            setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.module, k, v)


# a variant part that changes the plan's SparseConfig fields instead of module constants
_CFG = "cfg"

VARIANTS = {
    "merge_in_kernel": (sd, dict(MERGE_IN_KERNEL_DEFAULT=True)),
    "block_n64": (sd, dict(default_block_n=lambda *a, **k: 64)),
    "max_splits16": (sd, dict(MAX_SPLITS=16)),
    "chunk128": (ps, dict(SCORE_CHUNK_PAGES=128)),
    "score_warps4": (ps, dict(SCORE_NUM_WARPS=4)),
    "topk_warps8": (ps, dict(default_topk_warps=lambda *a, **k: 8)),
    "topk_warps4": (ps, dict(default_topk_warps=lambda *a, **k: 4)),
    # pages per scoring program fixed (the default grows it with the grid: 256 at batch 16)
    "score_chunk64": (ps, dict(default_chunk_pages=lambda *a, **k: 64)),
    "score_chunk256": (ps, dict(default_chunk_pages=lambda *a, **k: 256)),
    # the decode launch (both row launches of the overlapped plans)
    "min_tiles4": (sd, dict(MIN_SPLIT_TILES=4)),
    "min_tiles8": (sd, dict(MIN_SPLIT_TILES=8)),
    "min_tiles16": (sd, dict(MIN_SPLIT_TILES=16)),
    "min_tiles32": (sd, dict(MIN_SPLIT_TILES=32)),
    "stages2": (sd, dict(NUM_STAGES_16BIT=2)),
    "stages4": (sd, dict(NUM_STAGES_16BIT=4)),
    "warps8": (sd, dict(NUM_WARPS=8)),
    "warps2": (sd, dict(NUM_WARPS=2)),
    # the launch of the rows that read every page (large grids): 3 stages (the default before
    # session 12; now 2), 2 warps
    "full_stages3": (sd, dict(FULL_ROWS_NUM_STAGES_16BIT=3)),
    "full_warps2": (sd, dict(FULL_ROWS_NUM_WARPS=2)),
    # fewer, fuller splits for short full rows (the merge reads only the filled ones)
    "full_min_tiles8": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=8)),
    "full_min_tiles16": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=16)),
    "full_min_tiles32": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=32)),
    "full_min_tiles4": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=4)),
    "full_min_tiles6": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=6)),
    "full_min_tiles10": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=10)),
    "full_min_tiles12": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=12)),
    "full_min_tiles24": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=24)),
    "full_min_tiles8_stages3": (sd, dict(FULL_ROWS_MIN_SPLIT_TILES=8,
                                         FULL_ROWS_NUM_STAGES_16BIT=3)),
    "full_block_n64": (sd, dict(FULL_ROWS_BLOCK_N=64)),
    # the side stream (selection, the other rows) at the highest priority: its programs start
    # as SMs free up beside the full rows' launch, not after that launch's last wave
    "side_prio_high": (pl, dict(SIDE_STREAM_PRIORITY=-100)),
    # FA3 for the full rows (masked plan) leaving SMs free for the selection beside it
    **{f"fa3_margin{n}": ("vllm_sparse.full_rows_fa", dict(SM_MARGIN=n)) for n in (4, 8, 16)},
    # split partial outputs stored in bf16 (half the bytes the merge reads)
    "partials_bf16": (sd, dict(PARTIAL_DTYPE=torch.bfloat16)),
    "min_tiles8_stages4": (sd, dict(MIN_SPLIT_TILES=8, NUM_STAGES_16BIT=4)),
    "min_tiles16_warps8": (sd, dict(MIN_SPLIT_TILES=16, NUM_WARPS=8)),
    # our dense-mode launches (method "dense"; top-k's full rows) balanced over a fixed number
    # of programs (sparse_kernels.balanced_decode), and its launch options
    "balanced": (_CFG, dict(decode_dense_kernel="balanced")),
    **{f"balanced_p{n}": [(_CFG, dict(decode_dense_kernel="balanced")),
                          (bd, dict(PROGRAMS_PER_SM=n))] for n in (1, 3, 4, 5, 6, 8)},
    **{f"balanced_p{n}_bn{b}": [(_CFG, dict(decode_dense_kernel="balanced")),
                                (bd, dict(PROGRAMS_PER_SM=n, BLOCK_N=b))]
       for n in (1, 2, 3, 4, 5) for b in (16, 64, 128)},
    **{f"balanced_p{n}_stages{st}": [(_CFG, dict(decode_dense_kernel="balanced")),
                                     (bd, dict(PROGRAMS_PER_SM=n, NUM_STAGES_16BIT=st))]
       for n in (2, 4, 5) for st in (2, 4)},
    **{f"balanced_{name}": [(_CFG, dict(decode_dense_kernel="balanced")), (bd, consts)]
       for name, consts in (("bn64", dict(BLOCK_N=64)), ("stages2", dict(NUM_STAGES_16BIT=2)),
                            ("stages4", dict(NUM_STAGES_16BIT=4)), ("warps8", dict(NUM_WARPS=8)),
                            ("p1_stages4", dict(PROGRAMS_PER_SM=1, NUM_STAGES_16BIT=4)))},
    "balanced_bf16": [(_CFG, dict(decode_dense_kernel="balanced")),
                      (sd, dict(PARTIAL_DTYPE=torch.bfloat16))],
    # session 16: the balanced kernel's merge in a second launch (its default before), the
    # scoring grid's chunk capped at 256, 512 or 1024 pages (before: 256; now 512 at batch 16
    # in a 128K engine), 8 warps for the top-k of long rows (default 16), and session 15's
    # defaults (second-launch merge, chunk cap 256). (The session's first two runs had a
    # 1024-page default cap: their "topk_long8" is "topk_long8_max1024" here.)
    "merge_launch": (bd, dict(INLINE_MERGE=0)),
    "score_max256": (ps, dict(SCORE_CHUNK_MAX=256)),
    "score_max512": (ps, dict(SCORE_CHUNK_MAX=512)),
    "score_max1024": (ps, dict(SCORE_CHUNK_MAX=1024)),
    **{f"topk_long8{cap}": (ps, dict(TOPK_WARPS_LONG=8, TOPK_WARPS_LONG_WIDE=8, **extra))
       for cap, extra in (("", {}), ("_max256", dict(SCORE_CHUNK_MAX=256)),
                          ("_max512", dict(SCORE_CHUNK_MAX=512)),
                          ("_max1024", dict(SCORE_CHUNK_MAX=1024)))},
    "session15": [(bd, dict(INLINE_MERGE=0)), (ps, dict(SCORE_CHUNK_MAX=256))],
    # session 17: software-pipeline depth of the decode kernels. Triton gives each load of an
    # indirect chain (block table -> K/V) (stages - 1) // (levels + 1) stages of latency, so at
    # 3 stages K/V are loaded one tile ahead into one buffer (the wait at each tile's start
    # exposes the load); 5 stages (balanced, dense split) / 7 (the selection's two levels)
    # double-buffer them. MAXNREG caps the registers so that as many programs fit per SM.
    "bal_s5_r128": (bd, dict(NUM_STAGES_16BIT=5, MAXNREG=128)),
    "bal_s7_r128": (bd, dict(NUM_STAGES_16BIT=7, MAXNREG=128)),
    "bal_p3_s5": (bd, dict(PROGRAMS_PER_SM=3, NUM_STAGES_16BIT=5)),
    "bal_bn16_s5_r128": (bd, dict(BLOCK_N=16, NUM_STAGES_16BIT=5, MAXNREG=128)),
    "sel_s7_r128": (sd, dict(SELECTED_NUM_STAGES_16BIT=7, MAXNREG=128)),
    "sel_s10_r128": (sd, dict(SELECTED_NUM_STAGES_16BIT=10, MAXNREG=128)),
    "sd_s5_sel7_r128": (sd, dict(NUM_STAGES_16BIT=5, SELECTED_NUM_STAGES_16BIT=7,
                                 FULL_ROWS_NUM_STAGES_16BIT=5, MAXNREG=128)),
    # the full rows' launch before the selection's branch (pipeline.FULL_ROWS_FIRST); the
    # segment merge's loop unrolled twice (128 registers: MAXNREG keeps 4 programs per SM)
    "full_first": (pl, dict(FULL_ROWS_FIRST=1)),
    "bal_unroll2": (bd, dict(MERGE_UNROLL=2, MAXNREG=128)),
    "bal_r128": (bd, dict(MAXNREG=128)),
    # the scoring launch in 4 warps of at most 64 registers: its programs fit beside four
    # balanced programs per SM (no wait for SMs), alone and with the full rows launched first
    "score_w4_r64": (ps, dict(SCORE_NUM_WARPS=4, SCORE_MAXNREG=64)),
    "score_w4_r64_first": [(ps, dict(SCORE_NUM_WARPS=4, SCORE_MAXNREG=64)),
                           (pl, dict(FULL_ROWS_FIRST=1))],
    # session 18: the balanced programs' row search in two passes over seq_lens (session 17's),
    # and the segment merge loading 4 or 8 segments at once (146-168 registers uncapped:
    # MAXNREG keeps 4 programs per SM, spilling 24-108 bytes; see also bal_unroll2)
    "bal_twopass": (bd, dict(LOCATE_ONE_PASS=0)),
    "bal_ms4_r128": (bd, dict(MERGE_SEGMENTS=4, MAXNREG=128)),
    "bal_ms8_r128": (bd, dict(MERGE_SEGMENTS=8, MAXNREG=128)),
    # dynamic pieces (PIECES_PER_PROGRAM): programs take further equal pieces of the tile
    # order from a counter; 146-152 registers uncapped, so capped at 128 (12 bytes spilled)
    **{f"bal_pieces{n}_r128": (bd, dict(PIECES_PER_PROGRAM=n, MAXNREG=128)) for n in (2, 4, 8)},
    "pipe_all": [(bd, dict(NUM_STAGES_16BIT=5, MAXNREG=128)),
                 (sd, dict(NUM_STAGES_16BIT=5, SELECTED_NUM_STAGES_16BIT=7,
                           FULL_ROWS_NUM_STAGES_16BIT=5, MAXNREG=128))],
}


class _Variants:
    """Several :class:`_Variant` at once (constants of several modules), set on entry."""

    def __init__(self, parts: list[_Variant]):
        self.parts, self.stack = parts, None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        for part in self.parts:
            self.stack.enter_context(part)

    def __exit__(self, *exc):
        self.stack.close()


def _variant(name: str) -> _Variants:
    """The (not yet entered) context of a variant of :data:`VARIANTS`."""
    spec = VARIANTS[name]
    return _Variants([_Variant(name, mod, **consts)
                      for mod, consts in (spec if isinstance(spec, list) else [spec])])


def variant_config(name: str, cfg: SparseConfig) -> SparseConfig:
    """``cfg`` with the config fields a variant of :data:`VARIANTS` sets."""
    spec = VARIANTS[name]
    for mod, consts in (spec if isinstance(spec, list) else [spec]):
        if mod == _CFG:
            cfg = dataclasses.replace(cfg, **consts)
    return cfg


def _variant_modules(name: str) -> list:
    spec = VARIANTS[name]
    return [mod for mod, _ in (spec if isinstance(spec, list) else [spec])]


def run_config(args, ctx: int, batch: int, fa3, flush) -> dict:
    dev = flush.device
    dtype = getattr(torch, args.dtype)
    page, hq, hkv, d, L = (args.page_size, args.num_q_heads, args.num_kv_heads, args.head_dim,
                           args.layers)
    scale = 1.0 / math.sqrt(d)
    pages = triton.cdiv(ctx, page)
    width = max(args.table_pages, pages)
    # Each layer reads its own pages while they fit in --pool-gib (short contexts: what one
    # layer leaves in L2 is not what the next reads); longer ones cycle through fewer sets.
    page_bytes = 2 * page * hkv * d * torch.finfo(dtype).bits // 8
    sets = max(1, min(L, int(args.pool_gib * 2**30) // max(1, batch * pages * page_bytes)))
    num_blocks = sets * batch * pages + 1
    g = torch.Generator(device=dev).manual_seed(0)
    kv = torch.empty((2, num_blocks, page, hkv, d), dtype=dtype, device=dev)
    kv.normal_(generator=g)
    k_cache, v_cache = kv[0], kv[1]
    perm = torch.randperm(num_blocks - 1, generator=g, device=dev).to(torch.int32) + 1
    page_sets = []
    for i in range(sets):
        bt = torch.zeros((batch, width), dtype=torch.int32, device=dev)  # vLLM pads with 0
        bt[:, :pages] = perm[i * batch * pages:(i + 1) * batch * pages].view(batch, pages)
        summ = torch.empty((num_blocks, 2, hkv, d), dtype=dtype, device=dev)
        build_page_summaries(k_cache, summ, bt[:, :pages].contiguous(),
                             torch.full((batch,), ctx, dtype=torch.int32, device=dev))
        page_sets.append(_Layer(bt, summ))
    layers = [page_sets[i % sets] for i in range(L)]
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    # a mixed batch: the first --short-rows rows hold --short-context tokens
    seq_lens[:args.short_rows] = min(ctx, args.short_context)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn((batch, hq, d), dtype=dtype, device=dev, generator=g)
    out = torch.empty_like(q)
    ref = torch.empty_like(q)

    base = SparseConfig(token_budget=args.budget, sink_tokens=args.sink_tokens,
                        local_tokens=args.local_tokens)
    base.validate()
    base.check_model(head_size=d, page_size=page, num_kv_heads=hkv)
    k_sel, _, _ = decode_budget_pages(base, page)
    selected = torch.full((batch, hkv, k_sel), -1, dtype=torch.int32, device=dev)
    workspaces = {}

    def workspace() -> DecodeWorkspace:  # (a variant may change the partials' dtype)
        if sd.PARTIAL_DTYPE not in workspaces:
            workspaces[sd.PARTIAL_DTYPE] = DecodeWorkspace(
                batch, hq, d, device=dev,  # the most balanced programs a variant runs
                segments=batch + triton.cdiv(8 * sd._device_sms(dev), hkv))
        return workspaces[sd.PARTIAL_DTYPE]
    sws = SelectWorkspace(batch, hkv, width, device=dev, counters=True)

    masked_ops = _fa3_masked_ops() if fa3 is not None else None

    kept = torch.ones(batch, dtype=torch.int32, device=dev)  # (selection reuse: every row)

    def step(method: str, cfg: SparseConfig, schedule: str | None = None, keep=None):
        """``schedule``: None (FA3's own heuristic), "aot" (the ahead-of-time schedule) or
        "masked" (that schedule and FA3 writing only the full rows, beside the others)."""
        fr = None
        side = decode_side_stream(dev)  # (a variant may change its priority)
        masked = schedule == "masked"
        ws = workspace()
        if schedule is not None:  # once per step in the backend's builder; lengths are fixed
            fr = _full_rows_schedule(cfg, page, hq, hkv, d, dtype, batch, width * page,
                                     dev, masked_ops if masked else None
                                     ).prepare(seq_lens, qsl, batch, ctx)

        def fn():
            for lay in layers:
                rows = None
                if fa3 is not None and use_engine_dense_rows(cfg, batch, hkv, dev):
                    def rows(sl, o, max_len, lay=lay):  # what the vLLM backend passes
                        max_k = min(max_len, width * page)
                        if masked:
                            fa3_decode_rows(masked_ops[0], q, k_cache, v_cache, o, qsl,
                                            fr.q_lens, sl, max_k, lay.block_table, scale,
                                            scheduler_metadata=fr.scheduler_metadata,
                                            num_splits=fr.num_splits)
                            return
                        extra = {} if fr is None else dict(
                            scheduler_metadata=fr.scheduler_metadata, num_splits=fr.num_splits)
                        fa3(q, k_cache, v_cache, max_seqlen_q=1, cu_seqlens_q=qsl,
                            max_seqlen_k=max_k, seqused_k=sl,
                            block_table=lay.block_table, causal=True, softmax_scale=scale,
                            out=o, fa_version=3, **extra)
                decode_attention(method, cfg, q, k_cache, v_cache, lay.summaries,
                                 lay.block_table, seq_lens, out, scale, selected=selected,
                                 workspace=ws, select_workspace=sws, fuse_summary=False,
                                 side_stream=side, full_rows_attention=rows,
                                 full_rows_seq_lens=None if fr is None else fr.seq_lens,
                                 full_rows_disjoint=masked, keep=keep)
        return fn

    def fa3_step():
        for lay in layers:
            fa3(q, k_cache, v_cache, max_seqlen_q=1, cu_seqlens_q=qsl, max_seqlen_k=ctx,
                seqused_k=seq_lens, block_table=lay.block_table, causal=True,
                softmax_scale=scale, out=ref, fa_version=3)

    row = {"context": ctx, "batch": batch, "budget": args.budget, "table_pages": width,
           "short_rows": min(batch, args.short_rows), "short_context": args.short_context,
           "layers": L, "page_sets": sets, "row_kind": _row_kind(base, ctx, page),
           "us_per_layer": {}, "max_abs_diff_vs_fa3": {},
           "max_abs_diff_vs_dense": {}, "max_abs_diff_replay_vs_eager": {}}
    base = dataclasses.replace(base, decode_dense_rows="triton")
    plans = {"dense": ("dense", base)}
    for p in DECODE_SELECTS:
        plans[f"topk_{p}"] = ("topk", dataclasses.replace(base, decode_select=p))
    if fa3 is not None:  # the rows that read every page attended by FA3 (an option)
        plans["topk_auto_fa3rows"] = ("topk", dataclasses.replace(base, decode_dense_rows="engine"))
        plans["topk_auto_fa3rows_aot"] = ("topk", dataclasses.replace(base,
                                                                      decode_dense_rows="engine"))
        if masked_ops is not None:
            plans["topk_auto_fa3rows_masked"] = ("topk", dataclasses.replace(
                base, decode_dense_rows="engine"))
    # the same selection with every row attended after it (one decode launch, no side stream)
    plans["topk_auto_serial"] = ("topk", dataclasses.replace(base, decode_overlap=False))
    # a step in which every row keeps the selection of an earlier step (selection reuse,
    # SparseConfig.selection_reuse): no scoring or top-k, the attention over the stored pages.
    # With reuse R, a row's steps average (topk_auto + (R - 1) * topk_auto_kept) / R.
    plans["topk_auto_kept"] = ("topk", dataclasses.replace(base, selection_reuse=4))
    runs = [(name, m, c, None) for name, (m, c) in plans.items()]
    for v in args.variants:
        for name in args.variant_plans:
            m, c = plans[name]
            runs.append((f"{name}+{v}", m, variant_config(v, c), _variant(v)))
    if fa3 is not None:
        row["us_per_layer"]["fa3"] = _graph_time_us(fa3_step, args.iters, flush) / L
        fa3_step()
    if masked_ops is not None:  # FA3 with seqused_q: even rows attended, odd rows untouched
        q_lens = (torch.arange(batch, device=dev) % 2 == 0).to(torch.int32)
        out.fill_(float("nan"))
        fa3_decode_rows(masked_ops[0], q, k_cache, v_cache, out, qsl, q_lens, seq_lens * q_lens,
                        ctx, layers[-1].block_table, scale)
        even, odd = out[0::2].float(), out[1::2].float()
        row["fa3_masked_check"] = {
            "attended_rows_max_abs_diff_vs_fa3": (even - ref[0::2].float()).abs().max().item(),
            "other_rows_untouched": bool(odd.isnan().all().item()) if batch > 1 else None}
    # Attribution: the selection alone (each plan), then the attention alone over the
    # selection the default plan left in `selected`.
    def select_only(cfg=base, fuse_summary=False):
        for lay in layers:
            decode_select_pages(cfg, q, k_cache, lay.summaries, lay.block_table, seq_lens,
                                selected, sws, fuse_summary=fuse_summary)

    for p in DECODE_SELECTS:
        cfg = dataclasses.replace(base, decode_select=p)
        row["us_per_layer"][f"select_{p}"] = _graph_time_us(
            lambda cfg=cfg: select_only(cfg), args.iters, flush) / L
    # ... and the default selection's two launches apart: select_pages with its top-k launch
    # left out (the scoring as the backend runs it, or with the summary of the last page
    # refreshed in it, the path before session 12), then with its scoring left out (the
    # top-k over the scores it left).
    def skipping(launch: str):
        return _Variant(f"no{launch}", ps, **{launch: lambda *a, **k: None})

    with skipping("_topk_launch"):
        row["us_per_layer"]["score_only"] = _graph_time_us(select_only, args.iters, flush) / L
        row["us_per_layer"]["score_only_fused_summary"] = _graph_time_us(
            lambda: select_only(base, True), args.iters, flush) / L
        for v in args.variants:  # the scoring launch under the variants that change it
            if ps in _variant_modules(v):
                with _variant(v):
                    row["us_per_layer"][f"score_only+{v}"] = _graph_time_us(
                        select_only, args.iters, flush) / L
    with skipping("_launch_scoring"):
        row["us_per_layer"]["topk_only"] = _graph_time_us(select_only, args.iters, flush) / L
    decode_select_pages(base, q, k_cache, layers[0].summaries, layers[0].block_table, seq_lens,
                        selected, sws)

    # The step's KV write, one token per sequence into its last page (the values it writes
    # are the ones already there: the cache does not change).
    def last_slots(lay):
        last = (seq_lens.long() - 1)
        return lay.block_table.long().gather(1, (last // page)[:, None])[:, 0] * page + last % page
    writes = [(last_slots(lay), lay.summaries) for lay in layers]
    new_k = k_cache.view(-1, hkv, d)[writes[0][0]].clone()
    new_v = v_cache.view(-1, hkv, d)[writes[0][0]].clone()
    row["us_per_layer"]["kv_write_sparse"] = _graph_time_us(
        lambda: [write_kv_and_summaries(new_k, new_v, k_cache, v_cache, sl, summ)
                 for sl, summ in writes], args.iters, flush) / L
    cache_write = _vllm_cache_write()
    if cache_write is not None:
        row["us_per_layer"]["kv_write_vllm"] = _graph_time_us(
            lambda: [cache_write(new_k, new_v, k_cache, v_cache, sl) for sl, _ in writes],
            args.iters, flush) / L

    def attention_only():
        ws = workspace()
        for lay in layers:
            sd.sparse_decode(q, k_cache, v_cache, lay.block_table, seq_lens, selected, out=out,
                             scale=scale, workspace=ws)
    row["us_per_layer"]["attention_only"] = _graph_time_us(attention_only, args.iters, flush) / L
    for name, method, cfg, variant in runs:
        ctxm = variant if variant is not None else contextlib.nullcontext()
        with ctxm:
            if name.startswith("topk_auto_kept"):
                # selected: the default plan's selection of the last layer (whose output is
                # the one compared; every layer reads it, which changes no timing)
                decode_select_pages(base, q, k_cache, layers[-1].summaries,
                                    layers[-1].block_table, seq_lens, selected, sws)
            fn = step(method, cfg, schedule=_schedule_of(name),
                      keep=kept if name.startswith("topk_auto_kept") else None)
            out.fill_(float("nan"))
            t = _graph_time_us(fn, args.iters, flush) / L
            replayed = out.clone()  # what the captured graph (its branches joined) wrote
            fn()
            row["max_abs_diff_replay_vs_eager"][name] = (
                (replayed.float() - out.float()).abs().max().item())
        row["us_per_layer"][name] = t
        if fa3 is not None:
            row["max_abs_diff_vs_fa3"][name] = (out.float() - ref.float()).abs().max().item()
        if name == "topk_auto":
            topk_out = out.clone()
        elif name == "topk_auto_kept":  # the same pages as topk_auto's fresh selection
            row["max_abs_diff_kept_vs_topk_auto"] = (
                (out.float() - topk_out.float()).abs().max().item())
        if name == "dense":
            dense_out = out.clone()
        else:  # equal to dense where the rows read every page (short and dense rows)
            row["max_abs_diff_vs_dense"][name] = (out.float() - dense_out.float()).abs().max().item()
    if fa3 is not None:
        f = row["us_per_layer"]["fa3"]
        row["vs_fa3"] = {k: v / f for k, v in row["us_per_layer"].items()}
    del kv, layers, page_sets
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _vllm_cache_write():
    """vLLM's KV write of FLASH_ATTN (``reshape_and_cache_flash``, auto dtype), or None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash
    except Exception:  # noqa: BLE001 - no vLLM
        return None
    one = torch.ones((), dtype=torch.float32, device="cuda")

    def write(k, v, k_cache, v_cache, slots):
        reshape_and_cache_flash(k, v, k_cache, v_cache, slots, "auto", one, one)
    return write


def _schedule_of(plan: str) -> str | None:
    """The FA3 schedule a plan's full rows get (see ``step`` in :func:`run_config`)."""
    for suffix in ("aot", "masked"):
        if plan.split("+")[0].endswith(f"fa3rows_{suffix}"):
            return suffix
    return None


def _fa3_masked_ops():
    """vLLM's FA3 ops called with ``seqused_q`` (vllm_sparse.full_rows_fa), or None."""
    try:
        from vllm_sparse.full_rows_fa import fa3_masked_ops
    except Exception:  # noqa: BLE001 - no vLLM
        return None
    return fa3_masked_ops()


def fa3_decode_rows(*args, **kwargs):
    from vllm_sparse.full_rows_fa import fa3_decode_rows as run

    run(*args, **kwargs)


def _full_rows_schedule(cfg: SparseConfig, page: int, hq: int, hkv: int, d: int,
                        dtype: torch.dtype, batch: int, max_model_len: int, dev: torch.device,
                        masked_ops=None):
    """The vLLM backend's FullRowsSchedule as under full CUDA graphs on FA3 (vLLM 0.26's
    default ``flash_attn_max_num_splits_for_cuda_graph``, 32); ``masked_ops``
    (:func:`vllm_sparse.full_rows_fa.fa3_masked_ops`): the schedule of FA3 with
    ``seqused_q``."""
    from vllm.vllm_flash_attn import get_scheduler_metadata

    from vllm_sparse.full_rows_fa import FullRowsSchedule, fa3_masked_scheduler_metadata

    if masked_ops is not None:
        get_scheduler_metadata = fa3_masked_scheduler_metadata(masked_ops[1])
    return FullRowsSchedule(cfg, page_size=page, num_heads_q=hq, num_heads_kv=hkv, head_size=d,
                            kv_dtype=dtype, max_seqs=batch, max_model_len=max_model_len,
                            full_cuda_graphs=True, max_cudagraph_size=batch,
                            max_num_splits_for_cuda_graph=32, device=dev,
                            get_scheduler_metadata=get_scheduler_metadata,
                            masked=masked_ops is not None)


def _row_kind(cfg: SparseConfig, ctx: int, page: int) -> str:
    """What the top-k plans do with a sequence of ``ctx`` tokens."""
    k_sel, _, _ = decode_budget_pages(cfg, page)
    pages = triton.cdiv(ctx, page)
    if pages <= k_sel:
        return "short (reads every page through a full selection list)"
    if pages <= decode_dense_pages(cfg, page):
        return "dense (reads every page, no scoring or top-k)"
    return "sparse (top-k)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budget", type=int, default=SparseConfig.token_budget)
    p.add_argument("--sink-tokens", type=int, default=SparseConfig.sink_tokens)
    p.add_argument("--local-tokens", type=int, default=SparseConfig.local_tokens)
    p.add_argument("--table-pages", type=int, default=8256,
                   help="block-table width (vLLM: cdiv(max_model_len, page) padded; 8256 for "
                        "a 132K engine at page 16)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--short-rows", type=int, default=0,
                   help="mixed batches: this many rows of each batch hold --short-context tokens")
    p.add_argument("--short-context", type=int, default=4096)
    p.add_argument("--pool-gib", type=float, default=12.0,
                   help="KV bytes for distinct per-layer pages (beyond it layers share pages)")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    p.add_argument("--variant-plans", nargs="+", default=["topk_auto"],
                   help="plans timed under each variant (dense, topk_auto, topk_single, ...)")
    add_shape_args(p)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--require-fa3", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not _interpreting():
        sys.exit("bench_decode_engine.py needs a CUDA GPU (or TRITON_INTERPRET=1: a smoke run)")
    fa3, why = load_fa3()
    if fa3 is None:
        if args.require_fa3:
            sys.exit(f"FA3 unavailable ({why})")
        print(f"WARNING: FA3 unavailable ({why})", flush=True)
    now = _dt.datetime.now()
    out = args.out or str(Path(__file__).parent / "results" / f"decode_engine_{now:%Y%m%d}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    flush = torch.empty(256 * 1024 * 1024 // 4 if dev == "cuda" else 1, dtype=torch.int32,
                        device=dev)
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            row = run_config(args, ctx, batch, fa3, flush)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("context", "batch", "us_per_layer")}),
                  flush=True)
            result = {"command": " ".join([sys.executable, *sys.argv]),
                      "date": now.isoformat(timespec="seconds"),
                      "device": (torch.cuda.get_device_name() if dev == "cuda"
                                 else "cpu (interpreted)"), "torch": torch.__version__,
                      "triton": triton.__version__, "vllm": vllm_version(),
                      "shapes": {"num_q_heads": args.num_q_heads,
                                 "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
                                 "page_size": args.page_size, "dtype": args.dtype},
                      "rows": rows}
            with open(out, "w") as f:  # rewritten after every config: partial runs keep data
                json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

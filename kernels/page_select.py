"""Quest page scoring and top-k page selection for sparse decode.

score(page) = sum over the query heads g of the GQA group, sum over d of
              max(q[g, d] * min[page, d], q[g, d] * max[page, d])

Because ``max >= min``, ``max(q*mn, q*mx) = relu(q)*mx + min(q, 0)*mn``, so the group sum
collapses to two vectors per KV head: ``score = q_pos . mx + q_neg . mn`` with
``q_pos = sum_g relu(q_g)`` and ``q_neg = sum_g min(q_g, 0)`` (exact algebra; fp32 math).

Pipeline (all on device, static shapes, no host sync, CUDA-graph safe):

1. Scoring -- Triton kernel, grid ``(cdiv(max_pages, chunk_pages), batch, num_kv_heads)``: the
   grid scales with the pages (batch 1 at 128K context: 1024 programs), not with
   batch x heads. Writes ``scores [batch, num_kv_heads, max_pages]`` fp32: ``-inf`` beyond the
   sequence, ``+inf`` for the forced sink (first ``sink_pages``) and local (last
   ``local_pages``, counting the partially filled last page) pages. Optionally (``k_cache``,
   pure decode) it first refreshes the summary of each sequence's last page, replacing the
   separate ``update_page_summaries`` launch.
2. :func:`topk_pages` -- Triton radix-select kernel, grid ``(batch, num_kv_heads)``: the
   ``num_select`` best pages of each row, emitted in ascending order (ties to the lowest
   page); a sequence with at most ``num_select`` pages gets all of them followed by ``-1``
   padding. The row (<= 8192 pages per 8 warps) is held in registers; the radix passes start
   below the row's common key prefix (a fixed top byte puts nearly every fp32 score of a row,
   one exponent range, in one histogram bin; H100, 8192-page rows: select 57 -> 44 us).
   (``method="torch"``: ``torch.topk`` + sort, same result up to ties.)

   Two-stage variant (``topk_method="two_stage"``, or ``"auto"``: small grids and long rows;
   batch 1 at 8 KV heads is 8 programs on 132 SMs; the default, see :data:`DEFAULT_TOPK_METHOD`):
   grid ``(num_segments, batch, num_kv_heads)``,
   the exact top-k of each segment of a row into candidate buffers, then grid ``(batch,
   num_kv_heads)``, the top-k of each row's candidates (a row ``num_segments * num_select``
   long instead of ``max_pages``). Bit-identical to the single-stage output, ties included;
   see :func:`two_stage_plan`.

Dense rows: with ``dense_pages`` (a runtime int, so CUDA graphs stay valid), a row whose page
count ``n_pages`` satisfies ``num_select < n_pages <= dense_pages`` is not scored or selected: its
output row is ``[DENSE_ROW, -1, -1, ...]`` and :func:`~sparse_kernels.sparse_decode.sparse_decode`
reads every page of the sequence (a sequence just above the budget would otherwise pay the full
selection to drop a few pages). Rows of at most ``num_select`` pages keep the explicit list of
all their pages. Neither kind loads summaries in the scoring launch (unless raw scores are
stored for :func:`reselect_pages`), but both still get their last page's summary refreshed there
(``k_cache``), so it is valid once the sequence grows past the threshold.

``method="fused"`` runs both in one launch (the last scoring program of a row to finish,
per-row arrival counter, selects); measured slower on an H100, kept as an option.

Selection reuse (LServe-style, optional): :func:`select_pages` can also store the raw
(un-forced) scores; on the following steps :func:`reselect_pages` re-applies the sink/local
forcing for the *current* ``seq_lens`` to those stored scores and reruns top-k, skipping the
scoring kernel (the part that reads the summaries). Pages that appeared since the scoring step
have no score and are always selected (they are normally inside the local window).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv, next_power_of_2
from sparse_kernels.launch import fast_launch
from sparse_kernels.page_summary import _summarize_page
from sparse_kernels.tooling_env import apply_tooling_env, maxnreg_option

# Slot 0 of a selection row holding this (the rest -1): the row reads every page of its sequence.
DENSE_ROW = -2
_DENSE_ROW = tl.constexpr(DENSE_ROW)


def score_pages(
    q: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sink_pages: int = 0,
    local_pages: int = 0,
    scores: torch.Tensor | None = None,
    raw_scores: torch.Tensor | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
    k_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest scores of every logical page.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` (one decode token per sequence; any strides).
        summaries: ``[num_pages, 2, num_kv_heads, head_dim]`` (see ``page_summary``).
        block_table: int32 ``[batch, max_pages]``.
        seq_lens: int32 ``[batch]``.
        page_size: tokens per KV page.
        sink_pages / local_pages: pages forced to ``+inf`` (first / last of each sequence).
        scores: optional fp32 output ``[batch, num_kv_heads, max_pages]``.
        raw_scores: optional fp32 ``[batch, num_kv_heads, max_pages]``, also written with the
            scores before forcing (for :func:`reselect_pages`).
        block_p, num_warps: launch tuning (pages per program: a power of two, or a multiple
            of 64; warps).
        k_cache: optional; pure decode steps: refresh the summary of each sequence's last
            page from the keys in the same launch (see :func:`select_pages`).

    Returns:
        fp32 ``[batch, num_kv_heads, max_pages]``: ``-inf`` beyond the sequence, ``+inf`` for
        forced pages, the Quest score otherwise.
    """
    max_pages = block_table.shape[1]
    if scores is None:
        scores = torch.empty((q.shape[0], summaries.shape[2], max_pages), dtype=torch.float32,
                             device=q.device)
    _launch_scoring(q, summaries, block_table, seq_lens, page_size, sink_pages, local_pages,
                    scores, raw_scores, None, None, 0, 0, 0, k_cache, block_p, num_warps)
    return scores


@triton.jit
def _order_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf lowest, +inf highest)."""
    bits = x.to(tl.uint32, bitcast=True)
    neg = (bits >> 31) != 0
    all_ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    sign = tl.full([], 0x80000000, tl.uint32)
    return tl.where(neg, bits ^ all_ones, bits | sign)


@triton.jit
def _key_inf():
    """``_order_key(+inf)``: the key of forced pages."""
    return tl.full([], 0xFF800000, tl.uint32)


@triton.jit
def _u32(x: tl.constexpr):
    return tl.full([], x, tl.uint32)


@triton.jit
def _load_keys(row, stride_p, offs, n_pages, sink_pages, local_pages, FORCE: tl.constexpr,
               CG: tl.constexpr):
    """Order keys of ``row[offs]`` (valid where ``offs < n_pages``). ``FORCE``: sink / local
    pages and pages without a stored score (``-inf``) become ``+inf`` (selection reuse).
    ``CG``: load through L2 only (rows written by other programs of the same launch)."""
    m = offs < n_pages
    if CG:
        x = tl.load(row + offs * stride_p, mask=m, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(row + offs * stride_p, mask=m, other=0.0)
    if FORCE:
        forced = (offs < sink_pages) | (offs >= n_pages - local_pages) | (x == float("-inf"))
        x = tl.where(forced, float("inf"), x)
    return _order_key(x), m


@triton.jit
def _radix_digit(hist, prefix, remaining, shift):
    """From the 256-bin histogram of the digit at ``shift`` (among keys matching ``prefix``
    above it): the digit of the ``remaining``-th largest key, and how many keys are still to
    take at/below the extended prefix."""
    bins = tl.arange(0, 256)
    cum_ge = tl.cumsum(hist, 0, reverse=True)  # keys with digit >= d
    d_star = tl.max(tl.where(cum_ge >= remaining, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins > d_star, hist, 0), axis=0)
    prefix = prefix | (d_star.to(tl.uint32) << shift.to(tl.uint32))
    return prefix, remaining


@triton.jit
def _pass_mask(key, m, prefix, fixed_lo):
    """Valid, finite (not forced) keys whose bits ``>= fixed_lo`` equal ``prefix``'s."""
    fs = tl.minimum(fixed_lo, 31).to(tl.uint32)
    match = (fixed_lo >= 32) | ((key >> fs) == (prefix >> fs))
    return m & (key != _key_inf()) & match


@triton.jit
def _radix_start(lo, hi, n_inf, num_select):
    """Row-adaptive start of the radix select.

    Forced pages (``+inf``, ``n_inf`` of them) are always taken; the other valid keys lie in
    ``[lo, hi]`` and share every bit above the highest bit where ``lo`` and ``hi`` differ, so
    the passes start right below that common prefix: the first 8-bit digit spreads the keys
    over the bins (a fixed top byte would put nearly every fp32 score of a row in one bin:
    one exponent range) and only ``ceil(bits / 8)`` passes run.

    Returns ``(prefix, remaining, fixed_lo)``: bits ``>= fixed_lo`` of the k-th largest key
    are known (``prefix``), ``remaining`` keys are still to take at/below it.
    """
    remaining = num_select - n_inf
    d = hi ^ lo
    dd = d.to(tl.float32)
    top = tl.floor(tl.log2(tl.maximum(dd, 1.0))).to(tl.int32)
    top = tl.minimum(tl.maximum(top, 0), 31)
    one = tl.full([], 1, tl.uint32)
    # exact highest set bit (the float log2 may be off by one near powers of two)
    top = tl.where((one << top.to(tl.uint32)) > d, top - 1, top)
    top = tl.where((top < 31) & ((one << (tl.minimum(top + 1, 31)).to(tl.uint32)) <= d),
                   top + 1, top)
    low_mask = tl.where(top >= 31, tl.full([], 0xFFFFFFFF, tl.uint32),
                        (one << (tl.minimum(top + 1, 31)).to(tl.uint32)) - one)
    prefix = lo ^ (lo & low_mask)
    fixed_lo = top + 1
    fixed_lo = tl.where(d == 0, 0, fixed_lo)  # all finite keys equal: threshold is lo
    prefix = tl.where(d == 0, lo, prefix)
    # At least num_select forced pages: the threshold is +inf, ties by page order.
    all_forced = remaining <= 0
    prefix = tl.where(all_forced, _key_inf(), prefix)
    fixed_lo = tl.where(all_forced, 0, fixed_lo)
    remaining = tl.where(all_forced, num_select, remaining)
    return prefix, remaining, fixed_lo


@triton.jit
def _write_short_row(n_pages, num_select, out, stride_out, BLOCK: tl.constexpr):
    """Row of at most ``num_select`` pages: every page, then ``-1`` padding."""
    offs_b = tl.arange(0, BLOCK)
    for start in range(0, num_select, BLOCK):
        offs = start + offs_b
        tl.store(out + offs * stride_out, tl.where(offs < n_pages, offs, -1),
                 mask=offs < num_select)


@triton.jit
def _write_dense_row(num_select, out, stride_out, BLOCK: tl.constexpr):
    """Dense row: the sentinel, then ``-1`` padding (the decode reads every page)."""
    offs_b = tl.arange(0, BLOCK)
    for start in range(0, num_select, BLOCK):
        offs = start + offs_b
        tl.store(out + offs * stride_out, tl.where(offs == 0, _DENSE_ROW, -1),
                 mask=offs < num_select)


@triton.jit
def _threshold_regs(key, m, num_select):
    """Register-resident radix select: ``(prefix, remaining)``: ``prefix`` is the
    ``num_select``-th largest of the keys ``key[m]`` (more than ``num_select`` of them),
    ``remaining`` how many keys equal to it are still to take (the first ones in order)."""
    fin = m & (key != _key_inf())
    lo = tl.min(tl.where(fin, key, _u32(0xFFFFFFFF)), axis=0)
    hi = tl.max(tl.where(fin, key, _u32(0)), axis=0)
    n_inf = tl.sum((m & (key == _key_inf())).to(tl.int32), axis=0)
    prefix, remaining, fixed_lo = _radix_start(lo, hi, n_inf, num_select)
    while fixed_lo > 0:
        shift = tl.maximum(fixed_lo - 8, 0)
        mp = _pass_mask(key, m, prefix, fixed_lo)
        digit = ((key >> shift.to(tl.uint32)) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=mp)
        prefix, remaining = _radix_digit(hist, prefix, remaining, shift)
        fixed_lo = shift
    return prefix, remaining


@triton.jit
def _take_regs(key, m, prefix, remaining):
    """In-order compaction after :func:`_threshold_regs`: ``(take, pos)``: every key
    ``> prefix`` and the first ``remaining`` keys ``== prefix`` (ties: the earliest lanes),
    each with its output slot (lane order kept). One scan for both exclusive counts
    (tiles of at most 16384 lanes < 2**16): the ``>`` count in the high half."""
    gt = (m & (key > prefix)).to(tl.int32)
    eq = (m & (key == prefix)).to(tl.int32)
    packed = gt * 65536 + eq
    before = tl.cumsum(packed, 0) - packed
    eq_before = before & 65535
    take = (gt != 0) | ((eq != 0) & (eq_before < remaining))
    pos = (before >> 16) + tl.minimum(eq_before, remaining)
    return take, pos


@triton.jit
def _select_row(row, stride_p, n_pages, num_select, dense_pages, sink_pages, local_pages, out,
                stride_out, FORCE: tl.constexpr, CG: tl.constexpr, BLOCK: tl.constexpr,
                IN_REGS: tl.constexpr):
    """Top-``num_select`` of the first ``n_pages`` scores of one row, written to ``out``
    ascending (``-1`` padding when the row is shorter than the budget). A dense row
    (``num_select < n_pages <= dense_pages``) gets ``[DENSE_ROW, -1, ...]``; neither it nor a
    row shorter than the budget reads ``row``.

    Radix select on the order-preserving uint32 keys (8-bit digits, one histogram per pass,
    starting below the row's common prefix: :func:`_radix_start`) finds the k-th largest key
    T; an in-order compaction then emits every page with key > T and the first pages with
    key == T (ties go to the lowest pages). ``IN_REGS``: the whole row (``n_pages <= BLOCK``)
    is loaded once and kept in registers; otherwise every pass re-reads it in blocks.
    """
    offs_b = tl.arange(0, BLOCK)
    if n_pages <= num_select:
        _write_short_row(n_pages, num_select, out, stride_out, BLOCK)
    elif n_pages <= dense_pages:
        _write_dense_row(num_select, out, stride_out, BLOCK)
    elif IN_REGS:
        key, m = _load_keys(row, stride_p, offs_b, n_pages, sink_pages, local_pages, FORCE, CG)
        prefix, remaining = _threshold_regs(key, m, num_select)
        take, pos = _take_regs(key, m, prefix, remaining)
        tl.store(out + pos * stride_out, offs_b, mask=take)
    else:
        lo = tl.full([], 0xFFFFFFFF, tl.uint32)
        hi = tl.zeros([], dtype=tl.uint32)
        n_inf = 0
        for start in range(0, n_pages, BLOCK):
            key, m = _load_keys(row, stride_p, start + offs_b, n_pages, sink_pages,
                                local_pages, FORCE, CG)
            fin = m & (key != _key_inf())
            lo = tl.minimum(lo, tl.min(tl.where(fin, key, _u32(0xFFFFFFFF)), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(fin, key, _u32(0)), axis=0))
            n_inf += tl.sum((m & (key == _key_inf())).to(tl.int32), axis=0)
        prefix, remaining, fixed_lo = _radix_start(lo, hi, n_inf, num_select)
        while fixed_lo > 0:
            shift = tl.maximum(fixed_lo - 8, 0)
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n_pages, BLOCK):
                key, m = _load_keys(row, stride_p, start + offs_b, n_pages, sink_pages,
                                    local_pages, FORCE, CG)
                mp = _pass_mask(key, m, prefix, fixed_lo)
                digit = ((key >> shift.to(tl.uint32)) & 255).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=mp)
            prefix, remaining = _radix_digit(hist, prefix, remaining, shift)
            fixed_lo = shift
        taken = 0
        ties = 0
        for start in range(0, n_pages, BLOCK):
            offs = start + offs_b
            key, m = _load_keys(row, stride_p, offs, n_pages, sink_pages, local_pages,
                                FORCE, CG)
            gt = (m & (key > prefix)).to(tl.int32)
            eq = (m & (key == prefix)).to(tl.int32)
            eq_rank = ties + tl.cumsum(eq, 0) - eq
            take = gt | (eq & (eq_rank < remaining).to(tl.int32))
            pos = taken + tl.cumsum(take, 0) - take
            tl.store(out + pos * stride_out, offs, mask=take != 0)
            taken += tl.sum(take, axis=0)
            ties += tl.sum(eq, axis=0)


@fast_launch
@triton.jit
def _topk_pages_kernel(
    scores_ptr,
    seq_lens_ptr,
    sel_ptr,
    keep_ptr,
    num_select,
    dense_pages,
    sink_pages,
    local_pages,
    stride_sc_b,
    stride_sc_h,
    stride_sc_p,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    IN_REGS: tl.constexpr,
    FORCE: tl.constexpr,
    SHORT_BLOCK: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    """Grid ``(batch, num_kv_heads)``: :func:`_select_row` of each row of ``scores``.

    ``BLOCK`` covers the longest row the buffers allow (an engine's block-table width); with
    ``IN_REGS``, rows of at most ``SHORT_BLOCK`` pages take a register tile of that size
    instead (same algorithm, a quarter or less of the work: at 32K context and page 16 a row
    is 2048 pages while a 128K engine sizes BLOCK for 8192). ``HAS_KEEP``: rows whose
    ``keep`` flag is set keep their selection in ``sel`` (selection reuse) and are skipped."""
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    if HAS_KEEP:
        if tl.load(keep_ptr + seq_idx) != 0:
            return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    row = scores_ptr + seq_idx.to(tl.int64) * stride_sc_b + kv_head * stride_sc_h
    out = sel_ptr + seq_idx.to(tl.int64) * stride_sel_b + kv_head * stride_sel_h
    if IN_REGS and SHORT_BLOCK < BLOCK:
        if n_pages <= SHORT_BLOCK:
            _select_row(row, stride_sc_p, n_pages, num_select, dense_pages, sink_pages,
                        local_pages, out, stride_sel_k, FORCE, False, SHORT_BLOCK, True)
        else:
            _select_row(row, stride_sc_p, n_pages, num_select, dense_pages, sink_pages,
                        local_pages, out, stride_sel_k, FORCE, False, BLOCK, IN_REGS)
    else:
        _select_row(row, stride_sc_p, n_pages, num_select, dense_pages, sink_pages,
                    local_pages, out, stride_sel_k, FORCE, False, BLOCK, IN_REGS)


@fast_launch
@triton.jit
def _topk_stage1_kernel(
    scores_ptr,
    seq_lens_ptr,
    cand_key_ptr,
    cand_page_ptr,
    sel_ptr,
    keep_ptr,
    num_select,
    dense_pages,
    sink_pages,
    local_pages,
    seg_pages,
    stride_sc_b,
    stride_sc_h,
    stride_sc_p,
    stride_c_b,
    stride_c_h,
    stride_c_k,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    PAGE_SIZE: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    FORCE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    """Two-stage top-k, stage 1. Grid ``(num_segments, batch, num_kv_heads)``.

    Program ``s`` takes pages ``[s * seg_pages, (s + 1) * seg_pages)`` of its row (a
    ``SEG_BLOCK >= seg_pages`` register tile) and writes the segment's exact
    top-``num_select`` (same order and tie rule as :func:`_select_row`: ties to the lowest
    pages), in ascending page order, to candidate slots ``[s * num_select, (s + 1) *
    num_select)``: the order keys (bit patterns, int32) and the pages. A segment of at most
    ``num_select`` pages passes all of them, then pages ``-1``. Segments past the row's pages,
    short rows and dense rows write nothing (stage 2 reads no candidate of them). A row of
    at most ``seg_pages`` pages is its segment 0: that program writes the row's selection
    to ``sel`` itself and stage 2 skips the row (a 32K-token row in a 128K engine's table
    pays one register top-k, not two in a row: 50.6 -> 41.0 us per decode layer on an H100,
    ``benchmarks/results/decode_engine_2026-11-23_h100_session6/``)."""
    seg = tl.program_id(0)
    seq_idx = tl.program_id(1)
    kv_head = tl.program_id(2)
    if HAS_KEEP:  # (a row that keeps its selection: nothing to do in either stage)
        if tl.load(keep_ptr + seq_idx) != 0:
            return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    start = seg * seg_pages
    if (n_pages <= num_select) | (n_pages <= dense_pages) | (start >= n_pages):
        return
    row = scores_ptr + seq_idx.to(tl.int64) * stride_sc_b + kv_head * stride_sc_h
    cbase = seq_idx.to(tl.int64) * stride_c_b + kv_head * stride_c_h
    ck = cand_key_ptr + cbase + (seg * num_select) * stride_c_k
    cp = cand_page_ptr + cbase + (seg * num_select) * stride_c_k
    n_seg = tl.minimum(n_pages - start, seg_pages)
    loc = tl.arange(0, SEG_BLOCK)
    if n_seg <= num_select:
        # (Only the last segment of a row, or segments smaller than the budget.)
        for s0 in range(0, num_select, SEG_BLOCK):
            slot = s0 + loc
            pages = start + slot
            valid = slot < n_seg
            key, _ = _load_keys(row, stride_sc_p, pages, n_pages, sink_pages, local_pages,
                                FORCE, False)
            keep = slot < num_select
            tl.store(ck + slot * stride_c_k, key.to(tl.int32, bitcast=True), mask=keep & valid)
            tl.store(cp + slot * stride_c_k, tl.where(valid, pages, -1), mask=keep)
    else:
        pages = start + loc
        key, m = _load_keys(row, stride_sc_p, pages, n_pages, sink_pages, local_pages,
                            FORCE, False)
        m = m & (loc < seg_pages)
        prefix, remaining = _threshold_regs(key, m, num_select)
        take, pos = _take_regs(key, m, prefix, remaining)
        if n_pages <= seg_pages:  # the whole row: its final selection
            out = sel_ptr + seq_idx.to(tl.int64) * stride_sel_b + kv_head * stride_sel_h
            tl.store(out + pos * stride_sel_k, pages, mask=take)
        else:
            tl.store(ck + pos * stride_c_k, key.to(tl.int32, bitcast=True), mask=take)
            tl.store(cp + pos * stride_c_k, pages, mask=take)


@fast_launch
@triton.jit
def _topk_stage2_kernel(
    seq_lens_ptr,
    cand_key_ptr,
    cand_page_ptr,
    sel_ptr,
    keep_ptr,
    num_select,
    dense_pages,
    seg_pages,
    num_segments,
    stride_c_b,
    stride_c_h,
    stride_c_k,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    PAGE_SIZE: tl.constexpr,
    CAND_BLOCK: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    """Two-stage top-k, stage 2. Grid ``(batch, num_kv_heads)``.

    Short and dense rows get their fixed output rows (as in :func:`_select_row`); rows of at
    most ``seg_pages`` pages were selected by stage 1; any other
    row selects the exact top-``num_select`` of its candidates (the first ``cdiv(n_pages,
    seg_pages) * num_select`` slots, pages ``-1`` excluded). Every page of the row's top-k is
    among its segment's top-k, so this is the row's top-k; the candidates lie in ascending
    page order (segments in order, each ascending), so ties taken in slot order are ties
    taken by lowest page, and the output is ascending: identical to :func:`_select_row`."""
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    if HAS_KEEP:
        if tl.load(keep_ptr + seq_idx) != 0:
            return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    out = sel_ptr + seq_idx.to(tl.int64) * stride_sel_b + kv_head * stride_sel_h
    if n_pages <= num_select:
        _write_short_row(n_pages, num_select, out, stride_sel_k, CAND_BLOCK)
    elif n_pages <= dense_pages:
        _write_dense_row(num_select, out, stride_sel_k, CAND_BLOCK)
    elif n_pages > seg_pages:  # (a row within one segment was selected in stage 1)
        cbase = seq_idx.to(tl.int64) * stride_c_b + kv_head * stride_c_h
        n_cand = tl.minimum((n_pages + seg_pages - 1) // seg_pages, num_segments) * num_select
        idx = tl.arange(0, CAND_BLOCK)
        pages = tl.load(cand_page_ptr + cbase + idx * stride_c_k, mask=idx < n_cand, other=-1)
        m = pages >= 0
        key = tl.load(cand_key_ptr + cbase + idx * stride_c_k, mask=m, other=0)
        key = key.to(tl.uint32, bitcast=True)
        prefix, remaining = _threshold_regs(key, m, num_select)
        take, pos = _take_regs(key, m, prefix, remaining)
        tl.store(out + pos * stride_sel_k, pages, mask=take)


@fast_launch
@triton.jit
def _select_fused_kernel(
    q_ptr,
    summ_ptr,
    block_table_ptr,
    seq_lens_ptr,
    k_cache_ptr,
    scores_ptr,
    raw_ptr,
    sel_ptr,
    counter_ptr,
    keep_ptr,
    sink_pages,
    local_pages,
    max_pages,
    num_select,
    dense_pages,
    skip_pages,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_bt,
    stride_sc_b,
    stride_sc_h,
    stride_sc_p,
    stride_raw_b,
    stride_raw_h,
    stride_raw_p,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    PAGE_SIZE: tl.constexpr,
    PAGE_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SUB_BLOCKS: tl.constexpr,
    STORE_RAW: tl.constexpr,
    FUSE_SUMMARY: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    IN_REGS: tl.constexpr,
    DO_SELECT: tl.constexpr,
    SKIP_TAIL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):
    """Grid ``(num_chunks, batch, num_kv_heads)``; a chunk is ``BLOCK_P * SUB_BLOCKS`` pages.

    Every program scores its chunk of one (sequence, KV head) row (optionally refreshing the
    summary of the sequence's last page first) and stores the forced scores to the row
    (``-inf`` beyond the sequence). Rows of at most ``skip_pages`` pages (short and dense rows,
    whose top-k reads no score) load no summaries: their valid pages are stored as ``+inf``.
    ``DO_SELECT`` (method "fused"): the last program of a row to finish (per-row arrival
    counter, acq_rel atomics; it resets the counter, so the launch is replayable in a CUDA
    graph) runs the top-k of the whole row. One launch, grid scaling with the pages.
    ``HAS_KEEP``: a row whose ``keep`` flag is set (selection reuse) is neither scored nor
    selected (its summary refresh, ``FUSE_SUMMARY``, still runs).
    """
    pid_c = tl.program_id(0)
    seq_idx = tl.program_id(1)
    kv_head = tl.program_id(2)
    num_chunks = tl.num_programs(0)
    num_kv_heads = tl.num_programs(2)
    seq_idx64 = seq_idx.to(tl.int64)
    CHUNK: tl.constexpr = BLOCK_P * SUB_BLOCKS

    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    bt_row = block_table_ptr + seq_idx64 * stride_bt
    if SKIP_TAIL:
        # The grid covers the block table's width (the engine's longest possible sequence);
        # a chunk past this sequence's pages has nothing to score or refresh, and its reader
        # (the radix top-k) reads no score beyond n_pages.
        if pid_c * CHUNK >= n_pages:
            return

    if FUSE_SUMMARY:
        # Decode step: this step's token is the last of the sequence; its page's summary is
        # recomputed from the keys (as update_page_summaries would) before it is scored.
        last = n_pages - 1
        if (seq_len > 0) & (last // CHUNK == pid_c):
            phys_last = tl.load(bt_row + last).to(tl.int64)
            _summarize_page(
                k_cache_ptr, summ_ptr, phys_last, seq_len - last * PAGE_SIZE, kv_head,
                stride_k_page, stride_k_tok, stride_k_head, stride_k_dim,
                stride_s_page, stride_s_kind, stride_s_head, stride_s_dim,
                HEAD_DIM, HEAD_DIM_PAD, PAGE_PAD,
            )
        tl.debug_barrier()

    if HAS_KEEP:
        if tl.load(keep_ptr + seq_idx) != 0:
            return
    scored = n_pages > skip_pages  # else no summary loads (short and dense rows)
    if SKIP_TAIL:
        # ... and no scores: the radix top-k reads none of such a row (it writes the row's
        # fixed selection), so its programs end after the summary refresh
        if n_pages <= skip_pages:
            return
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq_idx64 * stride_q_b + (kv_head * GROUP + offs_g[:, None]) * stride_q_h
        + offs_d[None, :] * stride_q_d,
        mask=(offs_g[:, None] < GROUP) & mask_d[None, :] & scored,
        other=0.0,
    ).to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)  # [HEAD_DIM_PAD]
    q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)

    sc_row = scores_ptr + seq_idx64 * stride_sc_b + kv_head * stride_sc_h
    for sub in tl.static_range(SUB_BLOCKS):
        offs_p = pid_c * CHUNK + sub * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = offs_p < n_pages
        load = valid & scored
        phys = tl.load(bt_row + offs_p, mask=load, other=0)
        s_ptrs = (
            summ_ptr
            + phys.to(tl.int64)[:, None] * stride_s_page
            + kv_head * stride_s_head
            + offs_d[None, :] * stride_s_dim
        )
        mask = load[:, None] & mask_d[None, :]
        k_min = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        k_max = tl.load(s_ptrs + stride_s_kind, mask=mask, other=0.0).to(tl.float32)
        score = tl.sum(q_pos[None, :] * k_max + q_neg[None, :] * k_min, axis=1)
        score = tl.where(valid, score, float("-inf"))
        in_range = offs_p < max_pages
        if STORE_RAW:
            tl.store(
                raw_ptr + seq_idx64 * stride_raw_b + kv_head * stride_raw_h
                + offs_p * stride_raw_p,
                score,
                mask=in_range,
            )
        forced = valid & ((offs_p < sink_pages) | (offs_p >= n_pages - local_pages)
                          | (n_pages <= skip_pages))
        score = tl.where(forced, float("inf"), score)
        tl.store(sc_row + offs_p * stride_sc_p, score, mask=in_range)

    if DO_SELECT:
        # Arrive; the last program of the row selects. (bar.sync, then one acq_rel gpu-scope
        # atomic: the pattern of cooperative groups' grid sync.)
        tl.debug_barrier()
        cnt = counter_ptr + seq_idx * num_kv_heads + kv_head
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == num_chunks - 1:
            out = sel_ptr + seq_idx64 * stride_sel_b + kv_head * stride_sel_h
            _select_row(sc_row, stride_sc_p, n_pages, num_select, dense_pages, 0, 0, out,
                        stride_sel_k, False, True, ROW_BLOCK, IN_REGS)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


class SelectWorkspace:
    """Allocate-once scratch of :func:`select_pages` (CUDA-graph friendly).

    ``scores`` fp32 ``[max_batch, num_kv_heads, max_pages]`` (forced scores, read back by the
    top-k), ``counters`` int32 ``[max_batch * num_kv_heads]`` (per-row arrival counters
    of method "fused"; zero between launches: every launch resets what it used), and the
    candidate buffers of the two-stage top-k (``cand_keys`` / ``cand_pages``, int32, flat,
    ``candidates`` elements each; viewed as ``[batch, num_kv_heads, segments * num_select]``).

    ``candidates`` defaults to :func:`default_candidate_capacity`: enough for every batch the
    ``topk_method="auto"`` heuristic sends to the two-stage path (small grids only: a few MiB
    for a 128K-token engine on an H100). A forced two-stage call that needs more grows the
    buffers, outside CUDA-graph capture only (inside, it raises: size the workspace for it).
    """

    def __init__(self, max_batch: int, num_kv_heads: int, max_pages: int,
                 device: torch.device | str | None = None, counters: bool = True,
                 candidates: int | None = None):
        self.max_batch, self.num_kv_heads, self.max_pages = max_batch, num_kv_heads, max_pages
        self.scores = torch.empty((max_batch, num_kv_heads, max_pages), dtype=torch.float32,
                                  device=device)
        self.counters = torch.zeros((max_batch * num_kv_heads if counters else 1,),
                                    dtype=torch.int32, device=device)
        if candidates is None:
            candidates = default_candidate_capacity(max_batch, num_kv_heads, max_pages,
                                                    self.scores.device)
        self.cand_keys = torch.empty((candidates,), dtype=torch.int32, device=device)
        self.cand_pages = torch.empty((candidates,), dtype=torch.int32, device=device)

    def views(self, batch: int, num_kv_heads: int, max_pages: int):
        assert batch <= self.max_batch and num_kv_heads == self.num_kv_heads, (
            batch, self.max_batch, num_kv_heads, self.num_kv_heads)
        assert max_pages <= self.max_pages, (max_pages, self.max_pages)
        return self.scores[:batch, :, :max_pages], self.counters

    def candidate_views(self, batch: int, num_kv_heads: int, width: int):
        """``(keys, pages)`` int32 ``[batch, num_kv_heads, width]`` (two-stage top-k)."""
        n = batch * num_kv_heads * width
        if n > self.cand_keys.numel():
            if self.cand_keys.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"SelectWorkspace holds {self.cand_keys.numel()} two-stage candidates, "
                    f"this launch needs {n}; build it with candidates>={n} before capturing")
            self.cand_keys = torch.empty((n,), dtype=torch.int32, device=self.scores.device)
            self.cand_pages = torch.empty((n,), dtype=torch.int32, device=self.scores.device)
        shape = (batch, num_kv_heads, width)
        return self.cand_keys[:n].view(shape), self.cand_pages[:n].view(shape)


# Scoring launch defaults (pages per program, warps), and default_chunk_pages' growth: the
# chunk doubles up to 256 pages while the grid exceeds SCORE_PROGRAMS_PER_SM programs per SM,
# then up to SCORE_CHUNK_MAX while it exceeds SCORE_WIDE_PROGRAMS_PER_SM.
SCORE_CHUNK_PAGES = 64
SCORE_NUM_WARPS = 8
SCORE_PROGRAMS_PER_SM = 32
SCORE_CHUNK_MAX = 512
SCORE_WIDE_PROGRAMS_PER_SM = 8
# Warps of the top-k kernel for rows of more than 4096 pages (default_topk_warps), on small
# and on wide (sequence, KV head) grids.
TOPK_WARPS_LONG = 16
TOPK_WARPS_LONG_WIDE = 16
# Register cap of the scoring launch (0: none), e.g. 64 with 4 warps: 8192 registers, what an
# SM has left beside four balanced dense-mode programs.
SCORE_MAXNREG = 0
# Benchmarking only (see sparse_kernels.tooling_env), e.g. "SCORE_CHUNK_MAX=1024".
_TOOLING_ENV = "SPARSE_SERVE_PAGE_SELECT"
_TUNABLE = ("SCORE_CHUNK_PAGES", "SCORE_NUM_WARPS", "SCORE_PROGRAMS_PER_SM", "SCORE_CHUNK_MAX",
            "SCORE_WIDE_PROGRAMS_PER_SM", "TOPK_WARPS_LONG", "TOPK_WARPS_LONG_WIDE",
            "SCORE_MAXNREG")
apply_tooling_env(globals(), _TOOLING_ENV, _TUNABLE, os.environ.get(_TOOLING_ENV))
# Rows up to this many pages are top-k'd from registers (per 8 warps); longer rows loop.
_IN_REGS_PAGES_PER_8_WARPS = 8192
_LOOP_BLOCK = 4096


# Register tile of the top-k for rows of at most this many pages when the buffers are wider
# (see _topk_pages_kernel): 32K tokens at page 16.
SHORT_ROW_BLOCK = 2048

# Two-stage top-k (see two_stage_plan): largest register tiles of stage 1 (a segment) and
# stage 2 (a row's candidates); the "auto" heuristic needs rows of at least this many times
# the budget.
_MAX_SEGMENT_BLOCK = 8192
_MAX_CANDIDATE_BLOCK = 16384
TWO_STAGE_MIN_ROW_FACTOR = 4
# ... and block tables of at least this many pages: on an H200 (benchmarks/results/
# decode_2026-11-23_h200_two_stage.json) the two-stage top-k lost 10-15% on 2048-page rows
# (32K tokens) at batch 1-4 and won 5-34% on 8192/8256-page rows (128K) at batch 1-4.
TWO_STAGE_MIN_PAGES = 4096
TOPK_METHODS = ("auto", "single", "two_stage")
# "auto" since the H200 run above: both paths compiled, bit-identical selections on every
# measured shape (32K-132K tokens, batch 1-16, budgets 128 and 256 pages).
DEFAULT_TOPK_METHOD = "auto"


def _sms(device) -> int:
    from sparse_kernels.sparse_decode import _device_sms  # (sparse_decode imports this module)

    return _device_sms(torch.device(device) if device is not None else torch.device("cpu"))


def two_stage_plan(batch: int, num_kv_heads: int, max_pages: int, num_select: int,
                   device: torch.device | str | None,
                   segment_pages: int | None = None) -> tuple[int, int] | None:
    """``(segment_pages, num_segments)`` of the two-stage top-k over rows ``max_pages`` wide
    (the block table's width: static, so a CUDA graph captured per batch size stays valid), or
    ``None`` when the register tiles would not fit (or, for the default sizing, when no split
    into at least two segments exists).

    Default sizing: segments are powers of two of at least ``2 * num_select`` pages, with at
    most about one program per SM in stage 1 (``batch * num_kv_heads * num_segments <= SMs``);
    among those, the one minimizing ``segment tile + candidate tile`` (stage 1 and stage 2 run
    one after the other, each one latency-bound program per row or segment, with work
    proportional to its register tile), ties to the smaller segment. 8192 pages, budget 128
    pages, 8 KV heads, 132 SMs: 8 segments of 1024 pages, a 1024-candidate stage 2 (against a
    single 8192-page row). ``segment_pages`` overrides the segment size (any size >= 1).
    """
    if num_select <= 0 or max_pages <= 0:
        return None
    if segment_pages is not None:
        seg = max(1, int(segment_pages))
        n_seg = cdiv(max_pages, seg)
        if (next_power_of_2(seg) > _MAX_SEGMENT_BLOCK
                or next_power_of_2(n_seg * num_select) > _MAX_CANDIDATE_BLOCK):
            return None
        return seg, n_seg
    rows = max(1, batch * num_kv_heads)
    max_segments = max(2, _sms(device) // rows)
    best = None
    seg = next_power_of_2(max(2 * num_select, 1))
    while seg < max_pages and seg <= _MAX_SEGMENT_BLOCK:
        n_seg = cdiv(max_pages, seg)
        cand = next_power_of_2(n_seg * num_select)
        if n_seg <= max_segments and cand <= _MAX_CANDIDATE_BLOCK:
            cost = seg + cand
            if best is None or cost < best[0]:
                best = (cost, seg, n_seg)
        seg *= 2
    return None if best is None else (best[1], best[2])


def use_two_stage(batch: int, num_kv_heads: int, max_pages: int, num_select: int,
                  device: torch.device | str | None) -> bool:
    """``topk_method="auto"``: the two-stage top-k when the ``(batch, num_kv_heads)`` grid is
    small (:func:`~sparse_kernels.sparse_decode._small_grid`: at most half as many rows as SMs,
    batch 1 at 8 KV heads on an H100) and rows can be long (block-table width of at least
    :data:`TWO_STAGE_MIN_ROW_FACTOR` x the budget and at least :data:`TWO_STAGE_MIN_PAGES`
    pages), and a plan exists whose two register tiles
    together are at most half the single-stage row tile, to pay for the second launch (H100,
    8 KV heads: 128K tokens at page 16 = 8192 pages (8256 in vLLM's table), budgets of 128 to
    512 pages: batch 1 to 4; 2048 pages or fewer: never). Host ints only. A cost model,
    checked on an H200 for 2048-8256 pages, batch 1-16, budgets of 128 and 256 pages
    (``benchmarks/bench_decode.py --sweep`` times both paths)."""
    from sparse_kernels.sparse_decode import _small_grid

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not (num_select > 0 and max_pages >= TWO_STAGE_MIN_ROW_FACTOR * num_select
            and max_pages >= TWO_STAGE_MIN_PAGES and _small_grid(batch, num_kv_heads, dev)):
        return False
    plan = two_stage_plan(batch, num_kv_heads, max_pages, num_select, dev)
    if plan is None:
        return False
    # The plan's cost model against the single-stage row tile (the whole row in registers):
    # at most half of it, to pay for the second launch.
    seg, n_seg = plan
    cost = next_power_of_2(seg) + next_power_of_2(n_seg * num_select)
    return 2 * cost <= next_power_of_2(max_pages)


def default_candidate_capacity(max_batch: int, num_kv_heads: int, max_pages: int,
                               device: torch.device | str | None) -> int:
    """Two-stage candidates (per buffer) of :class:`SelectWorkspace`: ``max_pages`` per row for
    every batch the "auto" heuristic may send to the two-stage path (at most half as many rows
    as SMs). A default plan keeps at most ``max_pages`` candidates per row: ``num_segments *
    num_select <= num_segments * segment / 2 < max_pages`` (segments of ``>= 2 * num_select``
    pages, fewer than ``max_pages``)."""
    batch = min(max_batch, _sms(device) // max(1, 2 * num_kv_heads))
    return max(0, batch) * num_kv_heads * max(0, max_pages)


def default_stage1_warps(segment_pages: int) -> int:
    """Warps of a two-stage segment program: 4 up to 1024 pages, 8 up to 4096, else 16."""
    blk = next_power_of_2(max(1, segment_pages))
    return 4 if blk <= 1024 else (8 if blk <= 4096 else 16)


def _row_block(max_pages: int, num_warps: int, block: int | None = None):
    """(BLOCK, IN_REGS) of :func:`_select_row` for rows of ``max_pages``."""
    if block is not None:
        return block, False
    row = max(256, next_power_of_2(max(1, max_pages)))
    if row <= _IN_REGS_PAGES_PER_8_WARPS * max(1, num_warps // 8) and row <= 16384:
        return row, True
    return _LOOP_BLOCK, False


def topk_pages(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    out: torch.Tensor | None = None,
    method: str = "triton",
    block: int | None = None,
    num_warps: int | None = None,
    dense_pages: int = 0,
    topk_method: str = DEFAULT_TOPK_METHOD,
    segment_pages: int | None = None,
    stage1_warps: int | None = None,
    workspace: SelectWorkspace | None = None,
) -> torch.Tensor:
    """Top-``num_select`` logical pages of each row of ``scores``, sorted ascending.

    Args:
        scores: fp32 ``[batch, num_kv_heads, max_pages]``; only the first
            ``cdiv(seq_lens[b], page_size)`` pages of row ``b`` are candidates.
        seq_lens: int32 ``[batch]``.
        out: optional int32 ``[batch, num_kv_heads, num_select]``.
        method: ``"triton"`` (one radix-select kernel, grid ``(batch, num_kv_heads)``) or
            ``"torch"`` (``torch.topk`` + sort).
        block: force the looped (re-read) variant with this block size (testing / tuning;
            single-stage).
        dense_pages: rows of ``n_pages`` with ``num_select < n_pages <= dense_pages`` are dense
            rows (see :func:`select_pages`); runtime value.
        topk_method, segment_pages, stage1_warps: single- or two-stage radix top-k (method
            "triton"), see :func:`select_pages`.
        workspace: optional :class:`SelectWorkspace` holding the two-stage candidate buffers
            (else allocated per call).
    Returns:
        int32 ``[batch, num_kv_heads, num_select]``: a row with fewer than ``num_select``
        pages holds all of them followed by ``-1``; a dense row ``[DENSE_ROW, -1, ...]``.
        Static shapes, no host sync.
    """
    return _topk_launch(scores, seq_lens, page_size, num_select, dense_pages, 0, 0, False, out,
                        method, block, num_warps, topk_method=topk_method,
                        segment_pages=segment_pages, stage1_warps=stage1_warps,
                        workspace=workspace)


def resolve_topk_method(topk_method: str, batch: int, num_kv_heads: int, max_pages: int,
                        num_select: int, device, segment_pages: int | None = None,
                        block: int | None = None) -> str:
    """``"single"`` or ``"two_stage"`` for a top-k launch (host ints only)."""
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"unknown topk_method {topk_method!r} (one of {TOPK_METHODS})")
    if topk_method == "two_stage":
        if block is not None:
            raise ValueError("block (looped single-stage variant) with topk_method='two_stage'")
        if two_stage_plan(batch, num_kv_heads, max_pages, num_select, device,
                          segment_pages) is None:
            raise ValueError(f"no two-stage plan for rows of {max_pages} pages, budget "
                             f"{num_select} pages, segment_pages={segment_pages}")
        return "two_stage"
    if topk_method == "single" or block is not None:
        return "single"
    if segment_pages is not None:  # an explicit segment size asks for the two-stage path
        ok = two_stage_plan(batch, num_kv_heads, max_pages, num_select, device,
                            segment_pages) is not None
        return "two_stage" if ok else "single"
    ok = use_two_stage(batch, num_kv_heads, max_pages, num_select, device)
    return "two_stage" if ok else "single"


def _topk_launch(scores, seq_lens, page_size, num_select, dense_pages, sink, local, force, out,
                 method, block, num_warps, topk_method=DEFAULT_TOPK_METHOD, segment_pages=None,
                 stage1_warps=None, workspace=None, keep=None):
    batch, num_kv_heads, max_pages = scores.shape
    if out is None:
        if keep is not None:
            raise ValueError("keep (selection reuse) needs the output buffer of earlier steps")
        out = torch.empty((batch, num_kv_heads, num_select), dtype=torch.int32,
                          device=scores.device)
    if method == "torch":
        if force:
            scores = _force_torch(scores, seq_lens, page_size, sink, local)
        new = _topk_pages_torch(scores, seq_lens, page_size, num_select, dense_pages)
        if keep is not None:
            new = torch.where(keep[:batch, None, None] != 0, out, new)
        out.copy_(new)
        return out
    if batch == 0 or num_select == 0:
        return out
    path = resolve_topk_method(topk_method, batch, num_kv_heads, max_pages, num_select,
                               scores.device, segment_pages, block)
    if path == "two_stage":
        _two_stage_launch(scores, seq_lens, page_size, num_select, dense_pages, sink, local,
                          force, out, segment_pages, stage1_warps, num_warps, workspace, keep)
        return out
    if not num_warps:
        from sparse_kernels.sparse_decode import _small_grid

        num_warps = default_topk_warps(max_pages,
                                       wide=not _small_grid(batch, num_kv_heads, scores.device))
    blk, in_regs = _row_block(max_pages, num_warps, block)
    _topk_pages_kernel[(batch, num_kv_heads)](
        scores, seq_lens, out, seq_lens if keep is None else keep, num_select, dense_pages,
        sink, local,
        *scores.stride(), *out.stride(),
        PAGE_SIZE=page_size,
        BLOCK=blk,
        IN_REGS=in_regs,
        FORCE=force,
        SHORT_BLOCK=min(blk, SHORT_ROW_BLOCK),
        HAS_KEEP=keep is not None,
        num_warps=num_warps,
    )
    return out


def _two_stage_launch(scores, seq_lens, page_size, num_select, dense_pages, sink, local, force,
                      out, segment_pages, stage1_warps, stage2_warps, workspace, keep=None):
    """Two launches: per-segment exact top-k into candidate buffers (grid ``(num_segments,
    batch, num_kv_heads)``), then the top-k of each row's candidates (grid ``(batch,
    num_kv_heads)``). Static shapes (the plan depends on host ints only), no host sync."""
    batch, num_kv_heads, max_pages = scores.shape
    seg, n_seg = two_stage_plan(batch, num_kv_heads, max_pages, num_select, scores.device,
                                segment_pages)
    width = n_seg * num_select
    if workspace is None:
        ck = torch.empty((batch, num_kv_heads, width), dtype=torch.int32, device=scores.device)
        cp = torch.empty_like(ck)
    else:
        ck, cp = workspace.candidate_views(batch, num_kv_heads, width)
    seg_block = next_power_of_2(seg)
    _topk_stage1_kernel[(n_seg, batch, num_kv_heads)](
        scores, seq_lens, ck, cp, out, seq_lens if keep is None else keep, num_select,
        dense_pages, sink, local, seg,
        *scores.stride(), *ck.stride(), *out.stride(),
        PAGE_SIZE=page_size,
        SEG_BLOCK=seg_block,
        FORCE=force,
        HAS_KEEP=keep is not None,
        num_warps=stage1_warps or default_stage1_warps(seg),
    )
    cand_block = next_power_of_2(width)
    _topk_stage2_kernel[(batch, num_kv_heads)](
        seq_lens, ck, cp, out, seq_lens if keep is None else keep, num_select, dense_pages,
        seg, n_seg,
        *ck.stride(), *out.stride(),
        PAGE_SIZE=page_size,
        CAND_BLOCK=cand_block,
        HAS_KEEP=keep is not None,
        num_warps=stage2_warps or default_topk_warps(cand_block),
    )


def _topk_pages_torch(scores, seq_lens, page_size, num_select, dense_pages=0):
    max_pages = scores.shape[-1]
    idx = torch.arange(max_pages, device=scores.device)
    n_pages = (seq_lens.long() + page_size - 1) // page_size
    scores = torch.where(idx < n_pages[:, None, None], scores, float("-inf"))
    k = min(num_select, max_pages)
    vals, idx = torch.topk(scores, k, dim=-1, sorted=False)
    idx = torch.where(vals > float("-inf"), idx, max_pages)
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == max_pages, -1, idx).to(torch.int32)
    if k < num_select:
        pad = idx.new_full((*idx.shape[:-1], num_select - k), -1)
        idx = torch.cat([idx, pad], dim=-1)
    if num_select > 0:
        dense = (n_pages > num_select) & (n_pages <= dense_pages)
        sentinel = torch.full((num_select,), -1, dtype=idx.dtype, device=idx.device)
        sentinel[0] = DENSE_ROW
        idx = torch.where(dense[:, None, None], sentinel, idx)
    return idx


def _force_torch(raw_scores, seq_lens, page_size, sink_pages, local_pages):
    max_pages = raw_scores.shape[-1]
    idx = torch.arange(max_pages, device=raw_scores.device)[None, :]
    n_pages = ((seq_lens.long() + page_size - 1) // page_size)[:, None]
    valid = idx < n_pages
    forced = valid & ((idx < sink_pages) | (idx >= n_pages - local_pages))
    forced = forced[:, None, :] | (valid[:, None, :] & (raw_scores == float("-inf")))
    scores = torch.where(valid[:, None, :], raw_scores, float("-inf"))
    return torch.where(forced, float("inf"), scores)


def select_pages(
    q: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    local_pages: int,
    raw_scores: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    method: str = "triton",
    k_cache: torch.Tensor | None = None,
    workspace: SelectWorkspace | None = None,
    chunk_pages: int | None = None,
    num_warps: int | None = None,
    topk_warps: int | None = None,
    dense_pages: int = 0,
    topk_method: str = DEFAULT_TOPK_METHOD,
    segment_pages: int | None = None,
    stage1_warps: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest top-k selection of logical pages for each (sequence, KV head).

    Args: see :func:`score_pages`; ``num_select`` = ``token_budget // page_size``.
        ``sink_pages + local_pages`` should not exceed ``num_select``.
        out: optional int32 ``[batch, num_kv_heads, num_select]`` output buffer.
        method: ``"triton"`` (default): two launches: the page-chunk scoring kernel, grid
            ``(cdiv(max_pages, chunk_pages), batch, num_kv_heads)``, then the radix top-k
            kernel, grid ``(batch, num_kv_heads)``. ``"fused"``: one launch: the scoring
            programs, then the top-k of each row by the last of its programs to finish
            (arrival counters in ``workspace``); measured slower than "triton" on an H100
            (the top-k's registers lower the scoring occupancy), kept as an option.
            ``"torch"``: scoring kernel + ``torch.topk``.
        k_cache: optional ``[num_pages, page_size, num_kv_heads, head_dim]``. Decode rows
            only (one new token per sequence, already in the cache): the summary of each
            sequence's last page (the only page a decode token writes) is recomputed in the
            scoring launch, by the program that scores that page, before it scores it;
            this replaces a separate
            :func:`~sparse_kernels.page_summary.update_page_summaries` call. Dense and short
            rows are refreshed too; rows with ``seq_len == 0`` (padding) write nothing.
        workspace: :class:`SelectWorkspace` (scores scratch, and the arrival counters of
            "fused"); allocated per call if ``None``.
        chunk_pages, num_warps: scoring launch tuning (pages per program: a power of two or
            a multiple of 64; warps). topk_warps: warps of the top-k kernel (two-stage: of
            stage 2).
        dense_pages: a row with ``num_select < n_pages <= dense_pages`` is a dense row: no
            summaries are loaded for it (unless ``raw_scores`` is given) and no top-k runs;
            its output row is ``[DENSE_ROW, -1, ...]``. A runtime value (not compiled in),
            so CUDA graphs captured per batch size stay valid. ``0``: no dense rows.
        topk_method: top-k of method "triton": ``"single"``: one radix-select program per
            row; ``"two_stage"``: rows split into segments (:func:`two_stage_plan`), an exact
            top-k per segment into ``workspace``'s candidate buffers, then one program per row
            selects among its candidates (the same result, bit for bit, ties included);
            ``"auto"``: two-stage for small grids and long rows (:func:`use_two_stage`, e.g.
            batch 1 at 8 KV heads), else single. Default :data:`DEFAULT_TOPK_METHOD`. Host
            ints only (batch, heads, block-table width), so CUDA graphs stay valid.
        segment_pages: two-stage segment size (default: :func:`two_stage_plan`); given with
            ``topk_method="auto"``, it selects the two-stage path where a plan exists.
        stage1_warps: warps of the two-stage segment programs.
        keep: optional int32 ``[>= batch]`` (selection reuse,
            :mod:`sparse_kernels.selection_reuse`): rows with a nonzero flag are neither
            scored nor selected, their rows of ``out`` (which must then be given) keep what an
            earlier step wrote there. A device tensor: CUDA graphs stay valid.

    Returns:
        ``selected`` int32 ``[batch, num_kv_heads, num_select]``: logical page indices sorted
        ascending, ``-1`` padding at the end when a sequence has fewer than ``num_select``
        pages (it then selects all of them); ``[DENSE_ROW, -1, ...]`` for a dense row (read
        every page). Sink and local pages are always included; ties go to the lowest pages.
    """
    if method not in ("triton", "fused", "torch"):
        raise ValueError(f"unknown select method {method!r}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"unknown topk_method {topk_method!r} (one of {TOPK_METHODS})")
    batch = q.shape[0]
    num_kv_heads = summaries.shape[2]
    max_pages = block_table.shape[1]
    if out is None:
        out = torch.empty((batch, num_kv_heads, num_select), dtype=torch.int32,
                          device=q.device)
    if batch == 0 or num_select == 0:
        return out
    if keep is not None:
        assert keep.shape[0] >= batch and keep.dtype == torch.int32, (keep.shape, keep.dtype)
        keep = keep[:batch]
    if max_pages == 0:
        return out.fill_(-1)
    if workspace is None:
        workspace = SelectWorkspace(batch, num_kv_heads, max_pages, q.device,
                                    counters=method == "fused")
    scores, counters = workspace.views(batch, num_kv_heads, max_pages)
    if method == "fused" and counters.numel() < batch * num_kv_heads:
        raise ValueError("method='fused' needs a SelectWorkspace with arrival counters "
                         "(SelectWorkspace(..., counters=True))")
    dense_pages = max(0, dense_pages)
    # Rows whose top-k reads no score (at most num_select pages, or dense) load no summaries,
    # unless raw scores are stored for selection reuse (the row may outgrow both later).
    skip_pages = 0 if raw_scores is not None else max(num_select, dense_pages)
    if method == "fused":
        _launch_scoring(q, summaries, block_table, seq_lens, page_size, sink_pages,
                        local_pages, scores, raw_scores, out, counters, num_select,
                        dense_pages, skip_pages, k_cache, chunk_pages, num_warps, keep=keep)
        return out
    _launch_scoring(q, summaries, block_table, seq_lens, page_size, sink_pages, local_pages,
                    scores, raw_scores, None, None, num_select, dense_pages, skip_pages,
                    k_cache, chunk_pages, num_warps, skip_tail=method == "triton", keep=keep)
    return _topk_launch(scores, seq_lens, page_size, num_select, dense_pages, 0, 0, False, out,
                        method, None, topk_warps, topk_method=topk_method,
                        segment_pages=segment_pages, stage1_warps=stage1_warps,
                        workspace=workspace, keep=keep)


def _launch_scoring(q, summaries, block_table, seq_lens, page_size, sink_pages, local_pages,
                    scores, raw_scores, out, counters, num_select, dense_pages, skip_pages,
                    k_cache, chunk_pages, num_warps, skip_tail=False, keep=None):
    """Scoring launch (``out is None``) or the fused scoring + top-k launch. Rows of at most
    ``skip_pages`` pages load no summaries (their valid pages score ``+inf``)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = summaries.shape[2]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    assert summaries.shape[3] == head_dim, (summaries.shape, q.shape)
    group = num_q_heads // num_kv_heads
    max_pages = block_table.shape[1]
    if batch == 0 or max_pages == 0:
        return
    do_select = out is not None
    raw = scores if raw_scores is None else raw_scores
    if k_cache is not None:
        assert k_cache.shape[1] == page_size and k_cache.shape[2:] == summaries.shape[2:], (
            k_cache.shape, summaries.shape)
        kc, k_strides = k_cache, k_cache.stride()
    else:
        kc, k_strides = summaries, (0, 0, 0, 0)  # unused
    if not do_select:
        out, counters = scores, scores  # unused
    num_warps = num_warps or (8 if do_select else SCORE_NUM_WARPS)
    chunk = chunk_pages or default_chunk_pages(batch, num_kv_heads, max_pages, q.device,
                                               do_select)
    chunk = min(chunk, max(16, next_power_of_2(max_pages)))
    block_p = min(64, chunk)
    assert chunk % block_p == 0 and block_p & (block_p - 1) == 0, chunk
    row_block, in_regs = _row_block(max_pages, num_warps)
    grid = (cdiv(max_pages, chunk), batch, num_kv_heads)
    _select_fused_kernel[grid](
        q, summaries, block_table, seq_lens, kc, scores, raw, out, counters,
        seq_lens if keep is None else keep, sink_pages, local_pages, max_pages, num_select, dense_pages, skip_pages,
        *q.stride(), *summaries.stride(), *k_strides, block_table.stride(0),
        *scores.stride(), *raw.stride(), *out.stride(),
        PAGE_SIZE=page_size,
        PAGE_PAD=next_power_of_2(page_size),
        GROUP=group,
        GROUP_PAD=next_power_of_2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        BLOCK_P=block_p,
        SUB_BLOCKS=chunk // block_p,
        STORE_RAW=raw_scores is not None,
        FUSE_SUMMARY=k_cache is not None,
        ROW_BLOCK=row_block,
        IN_REGS=in_regs,
        DO_SELECT=do_select,
        # Only the two-launch radix top-k reads just the first n_pages scores; torch.topk
        # reads whole rows, the fused path counts every program, reuse keeps raw scores.
        SKIP_TAIL=skip_tail and not do_select and raw_scores is None,
        HAS_KEEP=keep is not None,
        num_warps=num_warps,
        **maxnreg_option(0 if do_select else SCORE_MAXNREG),
    )


def default_chunk_pages(batch: int, num_kv_heads: int, max_pages: int,
                        device: torch.device, fused: bool = False) -> int:
    """Pages per scoring program: :data:`SCORE_CHUNK_PAGES` (64: the most programs, best at
    batch 1), doubled up to 256 while the grid exceeds :data:`SCORE_PROGRAMS_PER_SM` (32)
    programs per SM of an H100 (132; measured there: 128K context, batch 16: 256 pages per
    program 0.222 ms vs 0.233 ms for 64), then up to :data:`SCORE_CHUNK_MAX` while it exceeds
    :data:`SCORE_WIDE_PROGRAMS_PER_SM` (8): in an engine of 128K tokens at batch 16, 512
    pages per program, 2112 programs instead of 4224, most of which exit at once when the
    rows are short. H100, us per layer of the top-k step at batch 16 and 4K / 32K / 128K
    tokens, 8192-page tables (decode_engine_2026-11-24_h100_session16/, machine 2): 256 pages
    107.1 / 273.0 / 420.7, 512 pages 105.8 / 272.3 / 418.7, 1024 pages 105.3 / 275.2 / 425.9.
    The fused launch starts at 128 (its programs carry the top-k's registers)."""
    chunk = 128 if fused else SCORE_CHUNK_PAGES

    def programs(c):
        return batch * num_kv_heads * cdiv(max_pages, c)

    while chunk < min(256, SCORE_CHUNK_MAX) and programs(chunk) > SCORE_PROGRAMS_PER_SM * 132:
        chunk *= 2
    while (256 <= chunk < SCORE_CHUNK_MAX
           and programs(chunk) > SCORE_WIDE_PROGRAMS_PER_SM * 132):
        chunk *= 2
    return chunk


def default_topk_warps(max_pages: int, wide: bool = False) -> int:
    """Warps of the top-k kernel: for rows of more than 4096 pages :data:`TOPK_WARPS_LONG`
    (16; 8192 pages, batch 1: select 0.0436 ms vs 0.0453 ms with 8 on an H100), or
    :data:`TOPK_WARPS_LONG_WIDE` on a ``wide`` grid (more (sequence, KV head) rows than half
    the SMs); else 8 (2048 pages: 0.0202 vs 0.0212)."""
    if max_pages <= 4096:
        return 8
    return TOPK_WARPS_LONG_WIDE if wide else TOPK_WARPS_LONG


def reselect_pages(
    raw_scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    local_pages: int,
    out: torch.Tensor | None = None,
    method: str = "triton",
    dense_pages: int = 0,
    topk_method: str = DEFAULT_TOPK_METHOD,
    segment_pages: int | None = None,
) -> torch.Tensor:
    """Selection reuse: top-k over stored raw scores, with sink/local forced for the current
    ``seq_lens``. Pages that were beyond the sequence when the scores were taken (``-inf``) but
    exist now are forced too. No summaries are read; one launch (the forcing is applied as the
    scores are loaded). Dense rows (``dense_pages``, see :func:`select_pages`) are decided on
    the current ``seq_lens``: a row that was dense when the scores were taken and has grown
    past ``dense_pages`` is selected from its stored scores (``select_pages`` scores every row
    when it stores raw scores).

    Args:
        raw_scores: fp32 ``[batch, num_kv_heads, max_pages]`` from a previous
            ``select_pages(..., raw_scores=buf)``.
        seq_lens: int32 ``[batch]``: the current lengths.
        topk_method, segment_pages: as in :func:`select_pages` (two-stage: the forcing is
            applied by stage 1; candidates allocated per call).
    Returns: like :func:`select_pages`.
    """
    return _topk_launch(raw_scores, seq_lens, page_size, num_select, max(0, dense_pages),
                        sink_pages, local_pages, True, out,
                        "torch" if method == "torch" else "triton", None, None,
                        topk_method=topk_method, segment_pages=segment_pages)


def _dense_rows(selected: torch.Tensor) -> torch.Tensor:
    """bool ``[batch, num_kv_heads]``: rows holding the :data:`DENSE_ROW` sentinel."""
    if selected.shape[-1] == 0:
        return torch.zeros(selected.shape[:-1], dtype=torch.bool, device=selected.device)
    return selected[..., 0] == DENSE_ROW


def pages_read(selected: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """int32 ``[batch, num_kv_heads]``: pages attended per (sequence, KV head) (a dense row:
    every page of its sequence). Device only."""
    n_pages = (seq_lens.long() + page_size - 1) // page_size
    listed = (selected >= 0).sum(dim=-1)
    return torch.where(_dense_rows(selected), n_pages[:, None], listed).to(torch.int32)


def tokens_read(selected: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """int32 ``[batch, num_kv_heads]``: KV tokens attended (last page counted partially; a
    dense row: ``seq_len``)."""
    seq = seq_lens.long()
    start = selected.long() * page_size
    n = (seq[:, None, None] - start).clamp(0, page_size)
    n = torch.where(selected >= 0, n, 0).sum(dim=-1)
    return torch.where(_dense_rows(selected), seq[:, None], n).to(torch.int32)


def density(selected: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """fp32 ``[batch, num_kv_heads]``: tokens attended / seq_len (1.0 = dense). Device only."""
    t = tokens_read(selected, seq_lens, page_size).float()
    return t / seq_lens.float().clamp_min(1)[:, None]

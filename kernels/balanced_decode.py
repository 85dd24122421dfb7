"""Dense paged decode with the work balanced over a fixed number of programs (stream-K).

One decode token per sequence; every page of each served sequence is read. Where
:mod:`sparse_kernels.sparse_decode` gives each (sequence, KV head) row a fixed number of splits,
here the tiles of all served rows of a KV head are laid end to end and cut into ``programs``
equal ranges, one per program, whatever the lengths in the batch: a program may finish one
row, attend a few short ones whole and start another. Grid ``(programs, num_kv_heads)``.

* A row a program attends whole is written to ``out`` directly.
* A row cut between programs leaves one normalized partial output and its log-sum-exp (base
  2) per program that attended part of it, at segment ``program + row`` (unique: both grow
  along the tiles). Inline merge (:func:`use_inline_merge`: launches of rows of at most
  ``full_pages`` pages): the last of those programs to finish merges them. Each adds the tiles
  it attended to the row's arrival counter (a CTA barrier, then one acq_rel gpu-scope atomic);
  the one that completes the row's tile count reads every segment back (L2, bypassing L1),
  writes the row and resets the counter, so the launch is replayable in a CUDA graph. Which
  programs hold the row follows from the same tile counts. Otherwise a second launch,
  :func:`_merge_segments_kernel`, grid ``(batch, num_kv_heads)``, merges them.

So the partials are at most ``programs + batch`` segments, not ``batch x splits``, and no
program waits on a long row while others idle. With :data:`PIECES_PER_PROGRAM` N > 1 (a
tooling option) the ranges are N x ``programs`` pieces: each program attends its own, then
takes the next free one from a per-KV-head counter, and "program" above reads "piece".

Each program finds its first row by a prefix sum of the tile counts (``seq_lens`` read in
chunks of :data:`SCAN_BLOCK`): no host work, no metadata built per step, static grid, so it
runs inside CUDA graphs. Empty rows (``seq_len`` 0, padding) hold no tiles: with the inline
merge, program ``p`` writes those of rows ``p, p + programs, ...``, only in a batch that has
any (the first prefix-sum pass counts them); else the merge launch does.

``rows_upto``: only sequences of at most that many pages are served (the others get no tiles
and their rows of ``out`` are not written): the rows a top-k decode reads whole, beside the
page selection (:func:`sparse_kernels.pipeline.decode_attention`). Empty rows pass the filter
and are written as zeros, as by ``sparse_decode``.

Reference: :func:`sparse_kernels.reference.dense_attention` (one query per sequence).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv, next_power_of_2
from sparse_kernels.launch import fast_launch
from sparse_kernels.sparse_decode import (
    _LOG2E,
    DecodeWorkspace,
    _attend_tile,
    _device_sms,
    _finish_softmax,
    _interpreting,
)
from sparse_kernels.tooling_env import apply_tooling_env, maxnreg_option

# Programs per SM (times the SMs, over the KV heads: the grid's first dimension). 4 is as many
# as an H100 SM holds at once (114 registers per thread, 4 warps): one wave. Measured at 4K x
# batch 16 (top-k step / dense, us per layer): 1: 203 / 189, 2: 141 / 119, 3: 112 / 108,
# 4: 108 / 103, 5: 133 / 129, 6: 125 / 120 (decode_engine_2026-11-24_h100_session14/).
PROGRAMS_PER_SM = 4
BLOCK_N = 32
NUM_WARPS = 4
NUM_STAGES_16BIT = 3
SCAN_BLOCK = 128
# Find a program's first row in one pass over ``seq_lens`` (batches of at most SCAN_BLOCK
# rows; 1) or in two (0: the total, then the row, as to session 17). Every program does this
# before its first tile.
LOCATE_ONE_PASS = 1
# Merge the partials of a row cut between programs in the last of them to finish (1), or in a
# second launch (0). Inline only where the launch serves rows of a bounded length
# (``full_pages``: top-k decode's full rows, a few segments each); a row of any length (dense
# decode) can be cut into tens of segments, whose serial merge in one program's tail was
# slower than a launch (H100, 128K x batch 16: 2879 against 2851 us per layer; 4K x 16 in the
# top-k plan: 105.9 against 107.5; decode_engine_2026-11-24_h100_session16/).
INLINE_MERGE = 1
# Segments of a cut row loaded at once by its merge (a power of two; 1: one after the other).
# More than 1 costs registers: 146-168 per thread for 2-8 (sm_90 ptxas), against 114 for 1,
# which leaves fewer than 4 programs per SM.
MERGE_SEGMENTS = 1
# Unroll factor of the segment-merge loop (1: none).
MERGE_UNROLL = 1
# Pieces per program (1: each program attends one equal range of the tile order, fixed). With
# N > 1 the order is cut into N x programs equal pieces: program p attends piece p, then takes
# the next of the remaining pieces from a per-KV-head counter until none is left, so programs
# that run fast attend more. Their tile rates vary by +-4%, randomly per program and launch
# (H100, 4K x 16: loops of equal tiles end 93-106 us apart, session 18); the cost is N times
# the segments per cut row for the serial merge. Not measured on a GPU yet.
PIECES_PER_PROGRAM = 1
# Register cap per thread passed to ptxas (0: none).
MAXNREG = 0
# decode_dense_kernel="auto" takes this kernel from this many (sequence, KV head) rows per SM
# (H100: batch 16 x 8 KV heads, 128 rows, wins; batch 8, 64 rows, loses; see config.py)
AUTO_MIN_ROWS_PER_SM = 0.75
_ROWS_ALL = 2**31 - 1
# Benchmarking only (the SPARSE_SERVE_ prefix is left to tooling): launch constants for an
# end-to-end A/B without a code change, e.g. "PROGRAMS_PER_SM=4,BLOCK_N=64".
_TOOLING_ENV = "SPARSE_SERVE_BALANCED_DECODE"
_TUNABLE = ("PROGRAMS_PER_SM", "BLOCK_N", "NUM_WARPS", "NUM_STAGES_16BIT", "INLINE_MERGE",
            "MAXNREG", "MERGE_UNROLL", "MERGE_SEGMENTS", "LOCATE_ONE_PASS",
            "PIECES_PER_PROGRAM")


def _apply_tooling_env(value: str | None) -> dict[str, int]:
    """Set the launch constants named in ``value`` ("NAME=INT,..."); unknown names raise."""
    return apply_tooling_env(globals(), _TOOLING_ENV, _TUNABLE, value)


_apply_tooling_env(os.environ.get(_TOOLING_ENV))


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _clock():
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _tile_counts(seq_lens, rows_upto, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles of each sequence served (of at most ``rows_upto`` pages), else 0."""
    n_pages = (seq_lens + PAGE_SIZE - 1) // PAGE_SIZE
    return tl.where(n_pages <= rows_upto, (seq_lens + BLOCK_N - 1) // BLOCK_N, 0)


@triton.jit
def _row_tiles(seq_lens_ptr, row, rows_upto, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles of row ``row`` served (:func:`_tile_counts` of its length)."""
    return _tile_counts(tl.load(seq_lens_ptr + row), rows_upto, PAGE_SIZE, BLOCK_N)


@triton.jit
def _scan_rows(seq_lens_ptr, batch, rows_upto, target, row, PAGE_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """Prefix sums of the served rows' tile counts, one chunk of ``SCAN`` rows at a time:
    (total tiles, rows whose tiles all lie before tile ``target``, first tile of the row after
    them (the row holding ``target``), tiles of the rows before row ``row``, empty rows)."""
    offs = tl.arange(0, SCAN)
    total = tl.zeros([], dtype=tl.int32)
    empty = tl.zeros([], dtype=tl.int32)
    rows_before = tl.zeros([], dtype=tl.int32)
    start = tl.zeros([], dtype=tl.int32)
    before_row = tl.zeros([], dtype=tl.int32)
    for b0 in range(0, batch, SCAN):
        ok = b0 + offs < batch
        lens = tl.load(seq_lens_ptr + b0 + offs, mask=ok, other=0)
        tiles = _tile_counts(lens, rows_upto, PAGE_SIZE, BLOCK_N)
        ends = tl.cumsum(tiles, 0) + total
        before = (ends <= target) & ok
        rows_before += tl.sum(before.to(tl.int32), 0)
        start = tl.maximum(start, tl.max(tl.where(before, ends, 0), 0))
        before_row += tl.sum(tl.where(b0 + offs < row, tiles, 0), 0)
        total += tl.sum(tiles, 0)
        empty += tl.sum(((lens == 0) & ok).to(tl.int32), 0)
    return total, rows_before, start, before_row, empty


@triton.jit
def _locate(seq_lens_ptr, batch, rows_upto, pid, programs, PAGE_SIZE: tl.constexpr,
            BLOCK_N: tl.constexpr, SCAN: tl.constexpr, ONE_PASS: tl.constexpr):
    """Program ``pid``'s tiles ``[lo, hi)`` and where they start: (total tiles, lo, hi, the
    row holding tile ``lo``, that row's first tile, empty rows). A batch of at most ``SCAN``
    rows is read once, with one prefix sum (every program does this before its first tile);
    larger ones (or all, without ``ONE_PASS``) take two passes of :func:`_scan_rows`."""
    if ONE_PASS and batch <= SCAN:
        offs = tl.arange(0, SCAN)
        ok = offs < batch
        lens = tl.load(seq_lens_ptr + offs, mask=ok, other=0)
        tiles = _tile_counts(lens, rows_upto, PAGE_SIZE, BLOCK_N)
        ends = tl.cumsum(tiles, 0)
        total = tl.sum(tiles, 0)
        empty = tl.sum(((lens == 0) & ok).to(tl.int32), 0)
        # (tile counts fit int32; their products with program ids may not)
        lo, hi = _program_tiles(pid.to(tl.int64), total, programs)
        lo, hi = lo.to(tl.int32), hi.to(tl.int32)
        before = (ends <= lo) & ok
        row = tl.sum(before.to(tl.int32), 0)
        row_start = tl.max(tl.where(before, ends, 0), 0)
    else:
        total, _, _, _, empty = _scan_rows(seq_lens_ptr, batch, rows_upto, -1, 0, PAGE_SIZE,
                                           BLOCK_N, SCAN)
        lo, hi = _program_tiles(pid.to(tl.int64), total, programs)
        lo, hi = lo.to(tl.int32), hi.to(tl.int32)
        _, row, row_start, _, _ = _scan_rows(seq_lens_ptr, batch, rows_upto, lo, 0,
                                             PAGE_SIZE, BLOCK_N, SCAN)
    return total, lo, hi, row, row_start, empty


@triton.jit
def _program_tiles(p, total, programs):
    """Tiles ``[lo, hi)`` of program ``p`` (int64: ``p * total`` may not fit int32)."""
    return p * total // programs, (p + 1) * total // programs


@triton.jit
def _first_program(tile, programs, total):
    """The program whose range ``[p * total // programs, (p + 1) * total // programs)`` holds
    ``tile``."""
    return ((tile + 1) * programs - 1) // total


@triton.jit
def _merge_row(out_ptr, part_out_ptr, part_lse_ptr, row64, head0, offs_d, mask_d,
               p0, p1, total, programs,
               stride_o_b, stride_o_h, stride_o_d,
               stride_po_s, stride_po_h, stride_po_d,
               stride_pl_s, stride_pl_h,
               GROUP: tl.constexpr, GROUP_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               SEGS: tl.constexpr, UNROLL: tl.constexpr):
    """Merge the segments of row ``row64`` written by programs ``p0 .. p1`` (int64) into
    ``out`` (query heads ``head0 ..``), ``SEGS`` segments per load: their loads are issued
    together, not one latency after another. Partials are loaded from L2 (``.cg``): in the
    inline merge, other SMs wrote them during this launch. ``GROUP_M``: the group padded to a
    power of two (not to the 16 rows of a tile's dot)."""
    offs_m = tl.arange(0, GROUP_M)
    mask_m = offs_m < GROUP
    heads = head0 + offs_m
    m = tl.full([GROUP_M], float("-inf"), dtype=tl.float32)
    w_sum = tl.zeros([GROUP_M], dtype=tl.float32)
    acc = tl.zeros([GROUP_M, HEAD_DIM_PAD], dtype=tl.float32)
    if SEGS == 1:
        for p in tl.range(p0, p1 + 1, loop_unroll_factor=UNROLL):
            seg = p + row64
            # with more programs than tiles, some programs in between hold none (wrote nothing)
            p_lo, p_hi = _program_tiles(p, total, programs)  # (p is int64)
            wrote = p_lo < p_hi
            lse = tl.load(part_lse_ptr + seg * stride_pl_s + heads * stride_pl_h,
                          mask=mask_m & wrote, other=float("-inf"), cache_modifier=".cg")
            po = tl.load(part_out_ptr + seg * stride_po_s + heads[:, None] * stride_po_h
                         + offs_d[None, :] * stride_po_d,
                         mask=mask_m[:, None] & mask_d[None, :] & wrote,
                         other=0.0, cache_modifier=".cg").to(tl.float32)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m - m_safe)
            w = tl.math.exp2(lse - m_safe)
            w_sum = w_sum * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * po
            m = m_new
    else:
        offs_s = tl.arange(0, SEGS)
        for c in tl.range(p0, p1 + 1, SEGS, loop_unroll_factor=UNROLL):
            p = c + offs_s  # (int64)
            p_lo, p_hi = _program_tiles(p, total, programs)
            wrote = (p <= p1) & (p_lo < p_hi)
            seg = p + row64
            lse = tl.load(part_lse_ptr + seg[:, None] * stride_pl_s
                          + heads[None, :] * stride_pl_h,
                          mask=wrote[:, None] & mask_m[None, :], other=float("-inf"),
                          cache_modifier=".cg")
            po = tl.load(part_out_ptr + seg[:, None, None] * stride_po_s
                         + heads[None, :, None] * stride_po_h
                         + offs_d[None, None, :] * stride_po_d,
                         mask=wrote[:, None, None] & mask_m[None, :, None]
                         & mask_d[None, None, :],
                         other=0.0, cache_modifier=".cg").to(tl.float32)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m - m_safe)
            w = tl.math.exp2(lse - m_safe[None, :])  # 0 where nothing was written
            w_sum = w_sum * alpha + tl.sum(w, 0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * po, 0)
            m = m_new
    o = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
    tl.store(out_ptr + row64 * stride_o_b + heads[:, None] * stride_o_h
             + offs_d[None, :] * stride_o_d, o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@fast_launch
@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["batch", "rows_upto", "programs", "piece_ctr_off", "stride_bt"],
    do_not_specialize_on_alignment=["block_table_ptr", "seq_lens_ptr"],
)
def _balanced_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, count_ptr, timing_ptr,
    scale_log2, batch, rows_upto, programs, piece_ctr_off,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_page, stride_k_tok, stride_k_head, stride_k_dim,
    stride_v_page, stride_v_tok, stride_v_head, stride_v_dim,
    stride_bt,
    stride_o_b, stride_o_h, stride_o_d,
    stride_po_s, stride_po_h, stride_po_d,
    stride_pl_s, stride_pl_h,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr, LOCATE_ONE_PASS: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, INLINE_MERGE: tl.constexpr, GROUP_M: tl.constexpr, MERGE_SEGMENTS: tl.constexpr,
    MERGE_UNROLL: tl.constexpr, PIECES: tl.constexpr, TIMING: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    if TIMING:  # diagnostics only (benchmarks/trace_balanced.py)
        gt_entry = _globaltimer()
        ck_entry = _clock()
        ck_merge = tl.zeros([], dtype=tl.int64)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    o_mask = mask_g[:, None] & mask_d[None, :]
    q_heads = kv_head * GROUP + offs_g

    # the tile order is cut into `pieces` equal ranges: piece `pid` first, then (PIECES > 1)
    # the ones after the first `programs` in the order programs ask for them
    pieces = programs * PIECES
    total, lo, hi, row, row_start, empty = _locate(seq_lens_ptr, batch, rows_upto, pid,
                                                   pieces, PAGE_SIZE, BLOCK_N, SCAN,
                                                   LOCATE_ONE_PASS)
    if INLINE_MERGE:
        if empty > 0:  # padding rows: no tiles, so no program meets them below
            for r in range(pid, batch, programs):
                if tl.load(seq_lens_ptr + r) == 0:
                    tl.store(out_ptr + (r + tl.zeros([], dtype=tl.int64)) * stride_o_b
                             + q_heads[:, None] * stride_o_h + offs_d[None, :] * stride_o_d,
                             tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=out_ptr.dtype.element_ty),
                             mask=o_mask)
    if PIECES == 1:
        if lo >= hi:
            return  # more programs than tiles
    if TIMING:
        ck_scan = _clock()
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    # PIECES > 1: this head's next-piece and finished-programs counters
    piece_ctr = count_ptr + piece_ctr_off + 2 * kv_head
    my_tiles = tl.zeros([], dtype=tl.int32)

    v = pid
    while v < pieces:
        my_tiles += tl.maximum(hi - lo, 0)
        t = lo
        while t < hi:
            row64 = row.to(tl.int64)
            seq_len = tl.load(seq_lens_ptr + row)
            n_row = _tile_counts(seq_len, rows_upto, PAGE_SIZE, BLOCK_N)
            row_end = row_start + n_row
            seg_lo = t - row_start
            seg_hi = tl.minimum(hi, row_end) - row_start
            if seg_hi > seg_lo:
                q = tl.load(
                    q_ptr + row64 * stride_q_b + q_heads[:, None] * stride_q_h
                    + offs_d[None, :] * stride_q_d,
                    mask=o_mask, other=0.0,
                )
                if UPCAST_DOT:
                    q = q.to(tl.float32)
                m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
                acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
                bt_row = block_table_ptr + row64 * stride_bt
                for tile in range(seg_lo, seg_hi):
                    offs_t = tile * BLOCK_N + offs_n  # token index in the sequence
                    tok_ok = offs_t < seq_len
                    page = offs_t // PAGE_SIZE
                    in_page = offs_t % PAGE_SIZE
                    phys = tl.load(bt_row + page, mask=tok_ok, other=0).to(tl.int64)
                    acc, m_i, l_i = _attend_tile(
                        q, acc, m_i, l_i, k_base, v_base, phys, in_page, tok_ok, offs_d, mask_d,
                        stride_k_page, stride_k_tok, stride_k_dim, stride_v_page, stride_v_tok,
                        stride_v_dim, scale_log2, UPCAST_DOT, DOT_PRECISION)
                o, lse = _finish_softmax(acc, m_i, l_i)
                if (seg_lo == 0) & (seg_hi == n_row):  # the whole row: no merge
                    tl.store(out_ptr + row64 * stride_o_b + q_heads[:, None] * stride_o_h
                             + offs_d[None, :] * stride_o_d,
                             o.to(out_ptr.dtype.element_ty), mask=o_mask)
                else:
                    seg = v.to(tl.int64) + row64
                    tl.store(part_out_ptr + seg * stride_po_s + q_heads[:, None] * stride_po_h
                             + offs_d[None, :] * stride_po_d,
                             o.to(part_out_ptr.dtype.element_ty), mask=o_mask)
                    tl.store(part_lse_ptr + seg * stride_pl_s + q_heads * stride_pl_h, lse,
                             mask=mask_g)
                    if INLINE_MERGE:
                        # Arrive with this segment's tiles; whoever completes the row merges it.
                        # (bar.sync, then one acq_rel gpu-scope atomic: every thread's stores
                        # above are visible to the merging program, whose loads follow its own
                        # acquire and a barrier.)
                        tl.debug_barrier()
                        cnt = count_ptr + row * tl.num_programs(1) + kv_head
                        mine = seg_hi - seg_lo
                        arrived = tl.atomic_add(cnt, mine, sem="acq_rel", scope="gpu")
                        if arrived + mine == n_row:
                            if TIMING:
                                ck_m0 = _clock()
                            tl.debug_barrier()
                            p0 = _first_program(row_start.to(tl.int64), pieces, total)
                            p1 = _first_program(row_start.to(tl.int64) + n_row - 1, pieces,
                                                total)
                            _merge_row(out_ptr, part_out_ptr, part_lse_ptr, row64,
                                       kv_head * GROUP, offs_d, mask_d, p0, p1, total, pieces,
                                       stride_o_b, stride_o_h, stride_o_d,
                                       stride_po_s, stride_po_h, stride_po_d,
                                       stride_pl_s, stride_pl_h, GROUP, GROUP_M, HEAD_DIM_PAD,
                                       MERGE_SEGMENTS, MERGE_UNROLL)
                            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
                            if TIMING:
                                ck_merge += _clock() - ck_m0
            t = tl.maximum(t, row_end)
            row_start = row_end
            row += 1
        if PIECES == 1:
            v = pieces
        else:
            v = programs + tl.atomic_add(piece_ctr, 1, sem="relaxed", scope="gpu")
            if v < pieces:
                # Pieces come in increasing order, so the new one starts in the last row
                # attended or after it: walk on from there with scalar loads (a vector search
                # here costs ~40 registers more for the whole kernel).
                if hi > lo:  # back to the last row attended
                    row -= 1
                    row_start -= _row_tiles(seq_lens_ptr, row, rows_upto, PAGE_SIZE, BLOCK_N)
                lo64, hi64 = _program_tiles(v.to(tl.int64), total, pieces)
                lo, hi = lo64.to(tl.int32), hi64.to(tl.int32)
                if hi > lo:  # (an empty piece, with more pieces than tiles, has no row)
                    n_r = _row_tiles(seq_lens_ptr, row, rows_upto, PAGE_SIZE, BLOCK_N)
                    while row_start + n_r <= lo:
                        row_start += n_r
                        row += 1
                        n_r = _row_tiles(seq_lens_ptr, row, rows_upto, PAGE_SIZE, BLOCK_N)
    if PIECES > 1:
        # Every program took its last (failed) piece before this: the last one out resets
        # both counters for the next launch (CUDA-graph replays).
        done = tl.atomic_add(piece_ctr + 1, 1, sem="acq_rel", scope="gpu")
        if done == programs - 1:
            tl.atomic_xchg(piece_ctr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(piece_ctr + 1, 0, sem="relaxed", scope="gpu")
    if TIMING:
        rec = timing_ptr + (kv_head * programs + pid).to(tl.int64) * 8
        tl.store(rec, _smid().to(tl.int64))
        tl.store(rec + 1, gt_entry)
        tl.store(rec + 2, _globaltimer())
        tl.store(rec + 3, ck_entry)
        tl.store(rec + 4, ck_scan)
        tl.store(rec + 5, my_tiles.to(tl.int64))
        tl.store(rec + 6, ck_merge)
        tl.store(rec + 7, _clock())


@fast_launch
@triton.jit(
    do_not_specialize=["batch", "rows_upto", "programs"],
    do_not_specialize_on_alignment=["seq_lens_ptr"],
)
def _merge_segments_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr,
    batch, rows_upto, programs,
    stride_o_b, stride_o_h, stride_o_d,
    stride_po_s, stride_po_h, stride_po_d,
    stride_pl_s, stride_pl_h,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr, GROUP_M: tl.constexpr, MERGE_SEGMENTS: tl.constexpr,
    MERGE_UNROLL: tl.constexpr,
):
    """``INLINE_MERGE=0``: the merge of the rows cut between programs, and the zeros of the
    empty rows, in a second launch."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + row)
    if (seq_len + PAGE_SIZE - 1) // PAGE_SIZE > rows_upto:
        return  # not a row of this launch
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_g = offs_g < GROUP
    o_mask = mask_g[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_heads = kv_head * GROUP + offs_g
    n_row = _tile_counts(seq_len, rows_upto, PAGE_SIZE, BLOCK_N)
    if n_row == 0:  # an empty (padding) row
        tl.store(out_ptr + row.to(tl.int64) * stride_o_b + q_heads[:, None] * stride_o_h
                 + offs_d[None, :] * stride_o_d,
                 tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=out_ptr.dtype.element_ty),
                 mask=o_mask)
        return
    # the row's first tile: the tiles of the rows before it
    total, _, _, start, _ = _scan_rows(seq_lens_ptr, batch, rows_upto, -1, row, PAGE_SIZE,
                                       BLOCK_N, SCAN)
    p0 = _first_program(start.to(tl.int64), programs, total)
    p1 = _first_program(start.to(tl.int64) + n_row - 1, programs, total)
    if p0 == p1:
        return  # one program attended it whole and wrote it
    _merge_row(out_ptr, part_out_ptr, part_lse_ptr, row.to(tl.int64), kv_head * GROUP, offs_d,
               offs_d < HEAD_DIM, p0, p1, total, programs, stride_o_b, stride_o_h, stride_o_d,
               stride_po_s, stride_po_h, stride_po_d, stride_pl_s, stride_pl_h,
               GROUP, GROUP_M, HEAD_DIM_PAD, MERGE_SEGMENTS, MERGE_UNROLL)


def balanced_fits(batch: int, num_kv_heads: int, device: torch.device) -> bool:
    """Whether ``decode_dense_kernel="auto"`` picks this kernel: grids of at least
    :data:`AUTO_MIN_ROWS_PER_SM` rows (batch x KV heads) per SM. Host ints only (a CUDA graph
    captured for a batch size keeps its choice)."""
    return batch * num_kv_heads >= AUTO_MIN_ROWS_PER_SM * _device_sms(device)


def default_programs(num_kv_heads: int, device: torch.device) -> int:
    """Programs per KV head: :data:`PROGRAMS_PER_SM` times the SMs, over the KV heads."""
    return max(1, cdiv(PROGRAMS_PER_SM * _device_sms(device), num_kv_heads))


def use_inline_merge(full_pages: int | None) -> bool:
    """The default merge of :func:`balanced_decode`: inline (:data:`INLINE_MERGE`) for
    launches that serve rows of at most ``full_pages`` pages, a second launch otherwise."""
    return bool(INLINE_MERGE) and full_pages is not None


def workspace_segments(max_batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Segments a :class:`DecodeWorkspace` needs for batches of up to ``max_batch`` rows at
    the default program count and :data:`PIECES_PER_PROGRAM` (``DecodeWorkspace(segments=
    ...)``; its counters then also hold the two piece counters per KV head)."""
    return max_batch + default_programs(num_kv_heads, device) * max(1, PIECES_PER_PROGRAM) + 2


def balanced_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    workspace: DecodeWorkspace | None = None,
    full_pages: int | None = None,
    programs: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    inline_merge: bool | None = None,
    timing: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense paged decode of one token per sequence, the tiles balanced over the programs.

    Args as :func:`sparse_kernels.sparse_decode.sparse_decode` (dense mode), and:
        full_pages: serve only sequences of at most this many pages (the other rows of
            ``out`` are not written); ``None``: every sequence.
        programs: programs per KV head (static; default :func:`default_programs`).
        workspace: scratch for the partials of rows cut between programs: its
            ``segment_out`` / ``segment_lse`` (``programs + batch`` segments, see
            ``DecodeWorkspace(segments=...)``) and ``segment_counters`` (the inline merge's
            arrival counters, zero between launches); allocated per call if absent or too
            small.
        inline_merge: merge those partials in the last program of each row rather than in a
            second launch. Default: :data:`INLINE_MERGE` where ``full_pages`` is given.
        timing: diagnostics only (compiled, not interpreted): int64 ``[num_kv_heads x
            programs, 8]`` that each program holding tiles fills with (SM, globaltimer at
            entry and exit, clock64 at entry and after its row search, its tiles, clock64
            cycles in inline merges, clock64 at exit); see ``benchmarks/trace_balanced.py``.

    Returns ``out``.
    """
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape[1:] == k_cache.shape[1:]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    block_n = block_n or BLOCK_N
    assert block_n >= 16 and block_n & (block_n - 1) == 0, block_n
    programs = programs or default_programs(num_kv_heads, q.device)
    rows_upto = _ROWS_ALL if full_pages is None else max(0, full_pages)
    pieces = max(1, PIECES_PER_PROGRAM)
    segments = programs * pieces + batch
    # row arrival counters, then (pieces > 1) two piece counters per KV head at the end
    counters = (batch + 2) * num_kv_heads
    if (workspace is None or workspace.segment_out is None
            or workspace.segment_out.shape[0] < segments
            or tuple(workspace.segment_out.shape[1:]) != (num_q_heads, head_dim)
            or workspace.segment_counters.numel() < counters):
        workspace = DecodeWorkspace(0, num_q_heads, head_dim, 1, q.device,
                                    segments=max(segments, batch + 2))
    part_out, part_lse = workspace.segment_out, workspace.segment_lse
    inline = use_inline_merge(full_pages) if inline_merge is None else bool(inline_merge)
    if num_warps is None:
        num_warps = NUM_WARPS
    if num_stages is None:
        num_stages = 2 if k_cache.element_size() >= 4 else NUM_STAGES_16BIT
    upcast = _interpreting() and k_cache.dtype == torch.bfloat16
    precision = "ieee" if k_cache.dtype == torch.float32 else None
    common = dict(PAGE_SIZE=page_size, GROUP=group,
                  GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim),
                  BLOCK_N=block_n, SCAN=SCAN_BLOCK, GROUP_M=next_power_of_2(group),
                  MERGE_SEGMENTS=MERGE_SEGMENTS, MERGE_UNROLL=MERGE_UNROLL)
    _balanced_decode_kernel[(programs, num_kv_heads)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
        workspace.segment_counters, workspace.segment_counters if timing is None else timing,
        scale * _LOG2E, batch, rows_upto, programs,
        workspace.segment_counters.numel() - 2 * num_kv_heads,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
        *out.stride(), *part_out.stride(), *part_lse.stride(),
        LOCATE_ONE_PASS=bool(LOCATE_ONE_PASS), UPCAST_DOT=upcast, DOT_PRECISION=precision,
        INLINE_MERGE=inline, PIECES=pieces,
        TIMING=timing is not None,
        num_warps=num_warps, num_stages=num_stages, **common, **maxnreg_option(MAXNREG),
    )
    if inline:
        return out
    _merge_segments_kernel[(batch, num_kv_heads)](
        out, part_out, part_lse, seq_lens, batch, rows_upto, programs * pieces,
        *out.stride(), *part_out.stride(), *part_lse.stride(),
        num_warps=4, **common,
    )
    return out


__all__ = ["balanced_decode", "balanced_fits", "default_programs", "use_inline_merge",
           "workspace_segments"]

"""Sparse (and dense) paged decode attention: split-KV flash-decoding over selected pages.

One decode token per sequence. Stage 1, grid ``(batch, num_kv_heads, num_splits)``: each
program takes its share of the selected logical pages of one (sequence, KV head), maps them to
physical pages through ``block_table``, masks tokens ``>= seq_len``, and runs an online softmax
for all query heads of the GQA group at once (group padded to 16 rows so ``tl.dot`` applies).
It writes a normalized partial output and its log-sum-exp (base 2); a split that holds no
tile writes nothing. Stage 2, grid ``(batch, num_q_heads)``, merges the splits that hold tiles
(it recomputes the row's split layout, :func:`_row_tiles`; ``merge_in_kernel=True``: the last split of each
(sequence, KV head) merges them inside stage 1 instead; measured slower on an H100, off by
default). With one split, stage 1 writes ``out`` directly. Tiles are 32 tokens; the split
count targets four waves of programs at small grids (batch 1) and about 32 at large ones
(:func:`default_block_n`, :func:`default_num_splits`; measured on an H200).

The selected pages are walked as a flat "slot space" of ``n_slots * page_size`` tokens; a tile
of ``BLOCK_N`` slot-space tokens may span several pages (page size 1 or 16) or part of one
(page size > BLOCK_N): token ``t`` is token ``t % page_size`` of selected page
``selected[t // page_size]``. Dense mode (``selected=None``) uses logical page = slot, and so
does a dense row of the sparse mode: a row whose slot 0 holds
:data:`~sparse_kernels.page_select.DENSE_ROW` reads every page of its sequence
(``cdiv(seq_len, page_size)`` slots, the splits partitioning its tiles as for any row).

The softmax is exact over the selected set. Valid entries of ``selected`` must precede the
``-1`` padding and be distinct (what :func:`sparse_kernels.page_select.select_pages` returns);
only the first ``min(num_select, cdiv(seq_len, page_size))`` slots of a list row are read.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv, next_power_of_2
from sparse_kernels.launch import fast_launch
from sparse_kernels.page_select import DENSE_ROW
from sparse_kernels.tooling_env import apply_tooling_env, maxnreg_option

_DENSE_ROW = tl.constexpr(DENSE_ROW)
_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Split count of large grids (batch x KV heads above half the SMs), in waves of programs. H200
# sweep (decode_2026-11-23_h200_two_stage.json), batch 16 x 8 KV heads, 128 rows: 33 splits of
# 32-token tiles (32 waves) took 69 / 107 us at budgets 2048 / 4096 tokens, against 73 / 127 us
# for the former rule (two waves: 3 splits of 64-token tiles), 75 / 113 us at 48 splits and
# 85 / 123 us at 64. Larger batches get proportionally fewer splits (about as many programs).
LARGE_GRID_WAVES = 32
# Merge the splits inside the main kernel (no second launch); see sparse_decode().
MERGE_IN_KERNEL_DEFAULT = False
# Fewest tiles a split of a row takes (sparse_decode(min_split_tiles=...)); 1: a row's tiles
# are spread over every split of the grid.
MIN_SPLIT_TILES = 1
ROW_FILTERS = ("all", "full", "select")
NUM_WARPS = 4
NUM_STAGES_16BIT = 3
# Launch options of the dense-mode launch for the rows that read every page (row_filter
# "full", beside the page selection); None: as every other launch.
FULL_ROWS_NUM_WARPS: int | None = None
# (16-bit caches, large grids: 2 stages, measured 110.9 against 113.6 us per layer for the
# top-k step at 4K batch 16 on an H100, decode_engine_2026-11-24_h100_session12)
FULL_ROWS_NUM_STAGES_16BIT: int | None = 2
FULL_ROWS_BLOCK_N: int | None = None
# Stages of launches that read a page selection (sequence -> selection -> block table -> K/V:
# two levels of indirection); None: NUM_STAGES_16BIT.
SELECTED_NUM_STAGES_16BIT: int | None = None
# Register cap per thread passed to ptxas (0: none).
MAXNREG = 0
# Fewest tiles per split of the full rows' launch on large grids (None: MIN_SPLIT_TILES): short
# rows then fill fewer, longer splits, and the merge reads only those. Off: shape-dependent on
# an H100 (-6 to +15 us per layer, decode_engine_2026-11-24_h100_session13/).
FULL_ROWS_MIN_SPLIT_TILES: int | None = None
_ROWS_ALL = 2**31 - 1
# Benchmarking only (see sparse_kernels.tooling_env), e.g. "SELECTED_NUM_STAGES_16BIT=7".
_TOOLING_ENV = "SPARSE_SERVE_SPARSE_DECODE"
_TUNABLE = ("NUM_WARPS", "NUM_STAGES_16BIT", "FULL_ROWS_NUM_STAGES_16BIT",
            "SELECTED_NUM_STAGES_16BIT", "MAXNREG")
apply_tooling_env(globals(), _TOOLING_ENV, _TUNABLE, os.environ.get(_TOOLING_ENV))
# dtype of the split partial outputs (the log-sum-exps stay fp32): a DecodeWorkspace's default
PARTIAL_DTYPE = torch.float32


@triton.jit
def _row_tiles(seq_len, sel_row, num_select, num_splits, min_split_tiles,
               PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr):
    """(slots, first selection entry, dense row?, tiles, tiles per split) of one (sequence, KV
    head) row: what the main kernel walks and how its splits partition it, which the split
    merge recomputes to read only the splits that hold data."""
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    if DENSE:
        first = -1
        row_dense = True
        n_slots = n_pages
    else:
        # A dense row (sentinel in slot 0) reads every page: logical page = slot.
        first = tl.load(sel_row, mask=num_select > 0, other=-1)
        row_dense = first == _DENSE_ROW
        n_slots = tl.where(row_dense, n_pages, tl.minimum(n_pages, num_select))
    n_tiles = tl.cdiv(n_slots * PAGE_SIZE, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(n_tiles, num_splits), min_split_tiles)
    return n_slots, first, row_dense, n_tiles, tiles_per_split


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_base, v_base, phys, in_page, tok_ok, offs_d, mask_d,
                 stride_k_page, stride_k_tok, stride_k_dim, stride_v_page, stride_v_tok,
                 stride_v_dim, scale_log2, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax (base 2) of a GQA group's queries ``q [GROUP_PAD,
    HEAD_DIM_PAD]``: keys and values of the tile's tokens (physical page ``phys``, slot
    ``in_page``; ``tok_ok`` masks the others) folded into ``(acc, m_i, l_i)``. Shared by the
    split (:func:`_sparse_decode_kernel`) and balanced decode kernels."""
    k_off = phys * stride_k_page + in_page.to(tl.int64) * stride_k_tok  # [BLOCK_N]
    k = tl.load(
        k_base + k_off[None, :] + offs_d[:, None] * stride_k_dim,
        mask=tok_ok[None, :] & mask_d[:, None],
        other=0.0,
    )  # [HEAD_DIM_PAD, BLOCK_N]
    v_off = phys * stride_v_page + in_page.to(tl.int64) * stride_v_tok
    # V is issued with K (before the dot): one HBM round trip per tile, not two.
    v = tl.load(
        v_base + v_off[:, None] + offs_d[None, :] * stride_v_dim,
        mask=tok_ok[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_N, HEAD_DIM_PAD]
    if UPCAST_DOT:
        k = k.to(tl.float32)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
    qk = tl.where(tok_ok[None, :], qk, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]

    if UPCAST_DOT:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _finish_softmax(acc, m_i, l_i):
    """(normalized output, log-sum-exp base 2; -inf where no token was attended)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    return acc / l_safe[:, None], lse


@fast_launch
@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_splits", "stride_bt", "rows_above", "rows_upto", "min_split_tiles",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr", "selected_ptr",
    ],
)
def _sparse_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    selected_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counter_ptr,
    scale_log2,  # softmax scale * log2(e)
    num_select,  # slots of `selected` per (sequence, KV head); unused in dense mode
    num_splits,
    rows_above,  # this launch serves the sequences of rows_above < n_pages <= rows_upto
    rows_upto,
    min_split_tiles,  # a split of a row takes at least this many tiles (the rest stay empty)
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_tok,
    stride_v_head,
    stride_v_dim,
    stride_bt,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_po_d,
    stride_pl_b,
    stride_pl_h,
    stride_pl_s,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MERGE_IN_KERNEL: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_idx64 = seq_idx.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    if (n_pages <= rows_above) | (n_pages > rows_upto):
        return  # another launch's row (see sparse_decode(row_filter=...))
    sel_row = selected_ptr + seq_idx64 * stride_sel_b + kv_head * stride_sel_h
    n_slots, first, row_dense, n_tiles, tiles_per_split = _row_tiles(
        seq_len, sel_row, num_select, num_splits, min_split_tiles, PAGE_SIZE, BLOCK_N, DENSE)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    if SPLIT:
        if MERGE_IN_KERNEL == 0:
            if tile_lo >= tile_hi:
                return  # an empty split: the merge reads only the splits that hold tiles

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP + offs_g

    q = tl.load(
        q_ptr + seq_idx64 * stride_q_b + q_heads[:, None] * stride_q_h
        + offs_d[None, :] * stride_q_d,
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    bt_row = block_table_ptr + seq_idx64 * stride_bt

    for tile in range(tile_lo, tile_hi):
        offs_t = tile * BLOCK_N + offs_n  # slot-space token index
        slot = offs_t // PAGE_SIZE
        in_page = offs_t % PAGE_SIZE
        slot_ok = slot < n_slots
        if DENSE:
            logical = slot
        else:
            listed = slot_ok & (first != _DENSE_ROW)  # no list loads for a dense row
            logical = tl.load(sel_row + slot * stride_sel_k, mask=listed, other=-1)
            logical = tl.where(row_dense, slot, logical)
        tok_ok = slot_ok & (logical >= 0) & (logical * PAGE_SIZE + in_page < seq_len)
        phys = tl.load(bt_row + logical, mask=tok_ok, other=0).to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, phys, in_page, tok_ok, offs_d, mask_d,
            stride_k_page, stride_k_tok, stride_k_dim, stride_v_page, stride_v_tok,
            stride_v_dim, scale_log2, UPCAST_DOT, DOT_PRECISION)

    o, lse = _finish_softmax(acc, m_i, l_i)
    o_mask = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        po_ptrs = (
            part_out_ptr + seq_idx64 * stride_po_b + q_heads[:, None] * stride_po_h
            + split * stride_po_s + offs_d[None, :] * stride_po_d
        )
        tl.store(po_ptrs, o.to(part_out_ptr.dtype.element_ty), mask=o_mask)
        tl.store(
            part_lse_ptr + seq_idx64 * stride_pl_b + q_heads * stride_pl_h + split * stride_pl_s,
            lse,
            mask=mask_g,
        )
        if MERGE_IN_KERNEL:
            # The last split of this (sequence, KV head) to finish merges them all: no second
            # launch. Per-row arrival counter (bar.sync + one acq_rel gpu-scope atomic), reset
            # by the merging program, so CUDA-graph replays find it at zero.
            tl.debug_barrier()
            cnt = counter_ptr + seq_idx * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                for g in tl.static_range(GROUP):
                    _merge_head(
                        out_ptr, part_out_ptr, part_lse_ptr, seq_idx64, kv_head * GROUP + g,
                        num_splits, stride_o_b, stride_o_h, stride_o_d,
                        stride_po_b, stride_po_h, stride_po_s, stride_po_d,
                        stride_pl_b, stride_pl_h, stride_pl_s,
                        HEAD_DIM, HEAD_DIM_PAD, SPLITS_PAD, True,
                    )
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
    else:
        o_ptrs = (
            out_ptr + seq_idx64 * stride_o_b + q_heads[:, None] * stride_o_h
            + offs_d[None, :] * stride_o_d
        )
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_head(
    out_ptr, part_out_ptr, part_lse_ptr, seq_idx, q_head, n_used,
    stride_o_b, stride_o_h, stride_o_d,
    stride_po_b, stride_po_h, stride_po_s, stride_po_d,
    stride_pl_b, stride_pl_h, stride_pl_s,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    CG: tl.constexpr,
):
    """LSE-weighted merge of the first ``n_used`` splits of one (sequence, query head), the
    ones that hold tiles (the others wrote nothing). ``CG``: read the partials through L2 only
    (written by other programs of the same launch)."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < n_used
    mask_d = offs_d < HEAD_DIM
    lse_ptrs = part_lse_ptr + seq_idx * stride_pl_b + q_head * stride_pl_h + offs_s * stride_pl_s
    po_ptrs = (part_out_ptr + seq_idx * stride_po_b + q_head * stride_po_h
               + offs_s[:, None] * stride_po_s + offs_d[None, :] * stride_po_d)
    po_mask = mask_s[:, None] & mask_d[None, :]
    if CG:
        lse = tl.load(lse_ptrs, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
        po = tl.load(po_ptrs, mask=po_mask, other=0.0, cache_modifier=".cg")
    else:
        lse = tl.load(lse_ptrs, mask=mask_s, other=float("-inf"))
        po = tl.load(po_ptrs, mask=po_mask, other=0.0)
    po = po.to(tl.float32)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # 0 for empty / masked splits
    w_sum = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * po, axis=0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(
        out_ptr + seq_idx * stride_o_b + q_head * stride_o_h + offs_d * stride_o_d,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


@fast_launch
@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_splits", "rows_above", "rows_upto", "min_split_tiles", "stride_sel_b",
    ],
    do_not_specialize_on_alignment=["seq_lens_ptr", "selected_ptr"],
)
def _merge_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    selected_ptr,
    num_select,
    num_splits,
    rows_above,
    rows_upto,
    min_split_tiles,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_po_d,
    stride_pl_b,
    stride_pl_h,
    stride_pl_s,
    stride_sel_b,
    stride_sel_h,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    q_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    if (n_pages <= rows_above) | (n_pages > rows_upto):
        return  # a row of another launch
    # the splits the main kernel filled for this row (it wrote no partial for the others)
    sel_row = (selected_ptr + seq_idx.to(tl.int64) * stride_sel_b
               + (q_head // GROUP) * stride_sel_h)
    _, _, _, n_tiles, tiles_per_split = _row_tiles(
        seq_len, sel_row, num_select, num_splits, min_split_tiles, PAGE_SIZE, BLOCK_N, DENSE)
    n_used = tl.cdiv(n_tiles, tiles_per_split)
    _merge_head(
        out_ptr, part_out_ptr, part_lse_ptr, seq_idx.to(tl.int64), q_head,
        n_used, stride_o_b, stride_o_h, stride_o_d,
        stride_po_b, stride_po_h, stride_po_s, stride_po_d,
        stride_pl_b, stride_pl_h, stride_pl_s,
        HEAD_DIM, HEAD_DIM_PAD, SPLITS_PAD, False,
    )


class DecodeWorkspace:
    """Allocate-once split-KV scratch (CUDA-graph friendly).

    ``partial_out`` ``[max_batch, num_q_heads, max_splits, head_dim]`` (``partial_dtype``,
    default :data:`PARTIAL_DTYPE`: fp32),
    ``partial_lse`` fp32 ``[max_batch, num_q_heads, max_splits]`` and ``counters`` int32
    (in-kernel split merge). ``segments`` > 0: also ``segment_out`` ``[segments, num_q_heads,
    head_dim]``, ``segment_lse`` and ``segment_counters``, the partials and arrival counters
    of :func:`sparse_kernels.balanced_decode.balanced_decode`, apart from the split ones so
    that it may run beside a ``sparse_decode`` launch on the same workspace.
    """

    def __init__(self, max_batch: int, num_q_heads: int, head_dim: int,
                 max_splits: int = MAX_SPLITS, device: torch.device | str | None = None,
                 partial_dtype: torch.dtype | None = None, segments: int = 0):
        self.max_batch = max_batch
        self.max_splits = max_splits
        dtype = partial_dtype or PARTIAL_DTYPE
        self.partial_out = torch.empty((max_batch, num_q_heads, max_splits, head_dim),
                                       dtype=dtype, device=device)
        self.segment_out = self.segment_lse = self.segment_counters = None
        if segments > 0:
            self.segment_out = torch.empty((segments, num_q_heads, head_dim), dtype=dtype,
                                           device=device)
            self.segment_lse = torch.empty((segments, num_q_heads), dtype=torch.float32,
                                           device=device)
            # per-(sequence, KV head) arrival counters of the balanced kernel's inline merge
            # (segments >= sequences), zero between launches
            self.segment_counters = torch.zeros((segments * num_q_heads,), dtype=torch.int32,
                                                device=device)
        self.partial_lse = torch.empty((max_batch, num_q_heads, max_splits),
                                       dtype=torch.float32, device=device)
        # per-(sequence, KV head) arrival counters of the in-kernel merge; zero between
        # launches (each launch resets what it used)
        self.counters = torch.zeros((max_batch * num_q_heads,), dtype=torch.int32,
                                    device=device)

    def views(self, batch: int, num_q_heads: int, head_dim: int, num_splits: int):
        assert batch <= self.max_batch and num_splits <= self.max_splits, (
            batch, self.max_batch, num_splits, self.max_splits)
        assert self.partial_out.shape[1] == num_q_heads and self.partial_out.shape[3] == head_dim
        return self.partial_out[:batch], self.partial_lse[:batch]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _small_grid(batch: int, num_kv_heads: int, device: torch.device) -> bool:
    """Fewer (sequence, KV head) rows than half the SMs: the latency-bound regime (batch 1)."""
    return batch * num_kv_heads * 2 <= _device_sms(device)


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def default_block_n(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Tokens per tile: 32. Measured: ~1-1.5 us faster than 64 at batch 1 on an H100; on an
    H200 (``benchmarks/results/decode_2026-11-23_h200_two_stage.json``, sweep) 32 beat 64 at
    every batch from 1 to 16 and budget (2048, 4096) tried, by 5-25% at batch 16."""
    return 32


def default_num_splits(batch: int, num_kv_heads: int, max_slot_tokens: int,
                       device: torch.device, block_n: int = 64) -> int:
    """Static split count: about four waves of programs when the grid is small (batch 1 is
    latency bound, shorter splits help), else about :data:`LARGE_GRID_WAVES` waves; at least
    one tile per split, at most :data:`MAX_SPLITS`.

    Depends only on host ints (batch, heads, the static token extent), so a CUDA graph
    captured for a batch size keeps it.
    """
    sms = _device_sms(device)
    waves = 4 if _small_grid(batch, num_kv_heads, device) else LARGE_GRID_WAVES
    splits = cdiv(waves * sms, max(1, batch * num_kv_heads))
    max_useful = max(1, cdiv(max_slot_tokens, block_n))
    return max(1, min(splits, max_useful, MAX_SPLITS))


def full_rows_num_stages(k_cache: torch.Tensor) -> int | None:
    """Pipeline stages of the launch for the rows that read every page (``row_filter="full"``)
    on large grids, where it differs from the other launches (16-bit caches:
    :data:`FULL_ROWS_NUM_STAGES_16BIT`); ``None``: the same as the others. A compile option:
    :func:`sparse_kernels.pipeline.warm_up_decode` compiles it before serving."""
    if k_cache.element_size() >= 4 or not FULL_ROWS_NUM_STAGES_16BIT:
        return None
    return FULL_ROWS_NUM_STAGES_16BIT if FULL_ROWS_NUM_STAGES_16BIT != NUM_STAGES_16BIT else None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    workspace: DecodeWorkspace | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    merge_in_kernel: bool | None = None,
    row_filter: str = "all",
    full_pages: int = 0,
    min_split_tiles: int | None = None,
) -> torch.Tensor:
    """Decode attention of one token per sequence over the selected pages (or all pages).

    Args:
        q: ``[batch, num_q_heads, head_dim]`` (any strides).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (any strides:
            NHD, HND, vLLM interleaved views).
        block_table: int32 ``[batch, max_pages]``.
        seq_lens: int32 ``[batch]``, including the current token.
        selected: int32 ``[batch, num_kv_heads, num_select]`` logical pages, ascending, ``-1``
            padding at the end (from ``select_pages``); a row ``[DENSE_ROW, -1, ...]`` reads
            every page of its sequence. ``None``: dense decode over all pages.
        out: ``[batch, num_q_heads, head_dim]`` output (written in place); allocated like
            ``q`` if ``None``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        num_splits: split-KV factor (static); default from :func:`default_num_splits`.
        workspace: preallocated scratch; allocated per call if ``None``.
        block_n: tokens per tile (power of two >= 16); default :func:`default_block_n`.
        num_warps, num_stages: Triton launch options of the main kernel (default
            :data:`NUM_WARPS`; stages :data:`NUM_STAGES_16BIT` for 16-bit caches, 2 for fp32,
            whose tiles are twice as large in shared memory).
        merge_in_kernel: merge the splits in the main kernel (the last split of each
            (sequence, KV head) to finish does it; arrival counters in the workspace) instead
            of a second launch. Default: :data:`MERGE_IN_KERNEL_DEFAULT`.
        row_filter, full_pages: which sequences this call serves (the others' rows of ``out``
            are not written): ``"all"``; ``"full"``: those of at most ``full_pages`` pages (the
            rows a top-k decode reads whole: its split count is then sized for them);
            ``"select"``: those of more. Two calls, one of each, write every row once, and
            neither waits for the other (:func:`sparse_kernels.pipeline.decode_attention`
            runs the ``"full"`` rows beside the page selection).
        min_split_tiles: a row's split takes at least this many tiles, so that short rows use
            fewer splits than the grid has (the rest write an empty partial). Default
            :data:`MIN_SPLIT_TILES`.

    Returns ``out``.
    """
    if row_filter not in ROW_FILTERS:
        raise ValueError(f"unknown row_filter {row_filter!r} (one of {ROW_FILTERS})")
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape[1:] == k_cache.shape[1:]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    # the full rows' launch has launch options of its own (FULL_ROWS_*; some on large grids)
    full = row_filter == "full"
    full_large = full and not _small_grid(batch, num_kv_heads, q.device)
    if block_n is None:
        block_n = (FULL_ROWS_BLOCK_N if full and FULL_ROWS_BLOCK_N
                   else default_block_n(batch, num_kv_heads, q.device))
    assert block_n >= 16 and block_n & (block_n - 1) == 0, block_n
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out

    dense = selected is None
    if dense:
        # unused in dense mode; constant, so that the kernel is not specialized on the block
        # table's width
        num_select, max_slots = 0, block_table.shape[1]
        sel, sel_strides = block_table, (0, 0, 0)
    else:
        assert selected.shape[:2] == (batch, num_kv_heads), (selected.shape, batch, num_kv_heads)
        num_select = max_slots = selected.shape[2]
        sel, sel_strides = selected, selected.stride()
    rows_above, rows_upto = -1, _ROWS_ALL
    if row_filter == "full":
        rows_upto = max(0, full_pages)
        max_slots = min(max_slots, rows_upto) if dense else max_slots
    elif row_filter == "select":
        rows_above = max(0, full_pages)
    if min_split_tiles is None:
        min_split_tiles = MIN_SPLIT_TILES
        if full_large and FULL_ROWS_MIN_SPLIT_TILES:
            min_split_tiles = FULL_ROWS_MIN_SPLIT_TILES
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, max_slots * page_size,
                                        q.device, block_n)
        if workspace is not None:
            num_splits = min(num_splits, workspace.max_splits)
    split = num_splits > 1
    if merge_in_kernel is None:
        merge_in_kernel = MERGE_IN_KERNEL_DEFAULT
    merge_in_kernel = merge_in_kernel and split
    if split:
        if workspace is None:
            workspace = DecodeWorkspace(batch, num_q_heads, head_dim, num_splits, q.device)
        part_out, part_lse = workspace.views(batch, num_q_heads, head_dim, num_splits)
        counters = workspace.counters
    else:
        part_out = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
        counters = part_lse

    if num_warps is None:
        num_warps = FULL_ROWS_NUM_WARPS if full and FULL_ROWS_NUM_WARPS else NUM_WARPS
    if num_stages is None:
        num_stages = 2 if k_cache.element_size() >= 4 else NUM_STAGES_16BIT
        if full_large:
            num_stages = full_rows_num_stages(k_cache) or num_stages
        elif not dense and SELECTED_NUM_STAGES_16BIT and k_cache.element_size() < 4:
            num_stages = SELECTED_NUM_STAGES_16BIT
    upcast = _interpreting() and k_cache.dtype == torch.bfloat16
    # fp32 caches: exact fp32 products (the default would be TF32 on the GPU).
    precision = "ieee" if k_cache.dtype == torch.float32 else None
    grid = (batch, num_kv_heads, num_splits)
    _sparse_decode_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, sel,
        out, part_out, part_lse, counters,
        scale * _LOG2E, num_select, num_splits, rows_above, rows_upto, max(1, min_split_tiles),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
        *sel_strides, *out.stride(), *part_out.stride(), *part_lse.stride(),
        PAGE_SIZE=page_size,
        GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        BLOCK_N=block_n,
        DENSE=dense,
        SPLIT=split,
        UPCAST_DOT=upcast,
        DOT_PRECISION=precision,
        MERGE_IN_KERNEL=merge_in_kernel,
        SPLITS_PAD=next_power_of_2(num_splits),
        num_warps=num_warps,
        num_stages=num_stages,
        **maxnreg_option(MAXNREG),
    )
    if split and not merge_in_kernel:
        _merge_splits_kernel[(batch, num_q_heads)](
            out, part_out, part_lse, seq_lens, sel, num_select, num_splits, rows_above,
            rows_upto, max(1, min_split_tiles),
            *out.stride(), *part_out.stride(), *part_lse.stride(), *sel_strides[:2],
            PAGE_SIZE=page_size,
            GROUP=group,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=next_power_of_2(head_dim),
            BLOCK_N=block_n,
            DENSE=dense,
            SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def dense_decode(q, k_cache, v_cache, block_table, seq_lens, out=None, scale=None,
                 num_splits=None, workspace=None, **launch) -> torch.Tensor:
    """Dense paged decode (``sparse_decode`` with every page selected)."""
    return sparse_decode(q, k_cache, v_cache, block_table, seq_lens, None, out, scale,
                         num_splits, workspace, **launch)


__all__ = ["DecodeWorkspace", "ROW_FILTERS", "default_block_n", "default_num_splits",
           "sparse_decode", "dense_decode"]

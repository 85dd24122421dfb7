"""XAttention block selection (antidiagonal scoring) for sparse prefill.

Score (per query block ``i``, key block ``j``, query head): strided rows and columns at
resolution ``S = stride``, aligned to absolute positions. Strided row ``r`` stacks the queries at
positions ``r*S + S-1, r*S + S-2, ..., r*S`` (reversed; zeros where the chunk has no query),
strided column ``c`` stacks the keys at ``c*S, ..., c*S + S-1`` (zeros past ``seq_len``), so
``row_r . col_c`` is the sum of ``q.k`` over one antidiagonal of the ``S x S`` tile ``(r, c)``.
As in XAttention, these ``S*D``-long dot products are taken as one small matmul per tile
(``S`` ``tl.dot``s of ``D``), softmaxed over the causal columns ``c <= r`` with scale
``softmax_scale / S``, summed over the ``B/S x B/S`` cells of each block and averaged over the
query block's rows. Selection: per query head, blocks ``0`` and ``i`` plus the smallest set of
other blocks whose cumulative probability reaches ``threshold`` (``block_select``); the lists
are the union over each GQA group.

GPU pipeline (no host sync): (1) ``_xattn_strided_lse_kernel``, one program per (row tile, KV
head) = ``RT`` strided rows x all ``G`` heads of the group, sweeps the causal strided columns and
writes, per (strided row, key block), the base-2 log-sum-exp of the row's scaled scores within
the block; (2) ``_xattn_block_scores_kernel`` per (query block, query head) normalises those by
each row's total and sums them into block probabilities; (3) ``build_block_lists``. The
per-block log-sum-exp buffer is ``[Hq, ~num_tokens/S, max_kv_blocks]`` fp32 -- 0.5 GB for a 16K
chunk at 128K context with 32 heads, S=8; chunk long prompts accordingly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import (
    PrefillBlockLists,
    PrefillBlockMeta,
    chunk_of_sequence,
    chunk_tiles,
    interpret_upcast,
    max_tiles,
)
from sparse_kernels.host_math import next_power_of_2

__all__ = ["xattention_block_scores", "estimate_xattention"]

_LOG2E = 1.4426950408889634


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_tiles", "stride_bt", "stride_lh", "stride_lr", "num_kv_blocks",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr", "qsl_ptr", "tile_seq_ptr", "tile_idx_ptr",
    ],
)
def _xattn_strided_lse_kernel(
    q_ptr, k_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    tile_seq_ptr, tile_idx_ptr,
    lse_ptr,
    qk_scale,  # softmax scale / S * log2(e)
    num_tiles,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_bt,
    stride_lh, stride_lr, stride_lk,
    num_kv_blocks,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    RT: tl.constexpr,  # strided rows per program (per head)
    STRIDE: tl.constexpr,
    R: tl.constexpr,  # strided columns per key block (block_size // STRIDE)
    BLOCK_C: tl.constexpr,  # strided columns per iteration (multiple of R, >= 16)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    tslot = num_tiles - 1 - pid  # longest rows first
    b = tl.load(tile_seq_ptr + tslot)
    if b < 0:
        return
    tidx = tl.load(tile_idx_ptr + tslot)
    seq_len, q_begin, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)

    ROWS: tl.constexpr = RT * G_PAD
    rows = tl.arange(0, ROWS)
    r_loc = rows // G_PAD
    r_head = rows % G_PAD
    srow = tidx * RT + r_loc  # absolute strided row
    head = kvh * G + r_head
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    NB_IT: tl.constexpr = BLOCK_C // R
    lse_row = lse_ptr + head.to(tl.int64) * stride_lh + (tslot * RT + r_loc).to(tl.int64) * stride_lr
    c_end = tl.minimum((tidx + 1) * RT, tl.cdiv(seq_len, STRIDE))
    for c0 in range(0, c_end, BLOCK_C):
        scol = c0 + offs_c
        s = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for t in range(0, STRIDE):  # dynamic: one set of smem buffers, pipelined
            qpos = srow * STRIDE + (STRIDE - 1 - t)
            q_ok = (qpos >= chunk_start) & (qpos < seq_len) & (r_head < G)
            q_tok = (q_begin + qpos - chunk_start).to(tl.int64)
            qt = tl.load(
                q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd,
                mask=q_ok[:, None], other=0.0,
            )
            kpos = scol * STRIDE + t
            k_ok = kpos < seq_len
            page = tl.load(bt_row + kpos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
            k_off = page * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_ks
            kt = tl.load(k_head + k_off[None, :] + offs_d[:, None] * stride_kd,
                         mask=k_ok[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            s += tl.dot(qt, kt, input_precision=DOT_PRECISION)
        s = s * qk_scale
        s = tl.where(scol[None, :] <= srow[:, None], s, float("-inf"))
        s3 = tl.reshape(s, [ROWS, NB_IT, R])
        m = tl.max(s3, 2)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.sum(tl.exp2(s3 - m_safe[:, :, None]), 2)
        lse = m_safe + tl.log2(e)  # -inf where the block has no causal column
        kb = c0 // R + tl.arange(0, NB_IT)
        tl.store(lse_row[:, None] + kb[None, :] * stride_lk, lse,
                 mask=(r_head < G)[:, None] & (kb < num_kv_blocks)[None, :])


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_lh", "stride_lr", "stride_si", "stride_sh", "num_kv_blocks",
    ],
    do_not_specialize_on_alignment=[
        "seq_lens_ptr", "qsl_ptr", "qb_seq_ptr", "qb_idx_ptr", "seq_first_ptr",
        "seq_slot0_ptr",
    ],
)
def _xattn_block_scores_kernel(
    lse_ptr, score_ptr,
    qb_seq_ptr, qb_idx_ptr, seq_lens_ptr, qsl_ptr,
    seq_first_ptr, seq_slot0_ptr,
    stride_lh, stride_lr, stride_lk,
    stride_si, stride_sh, stride_sk,
    num_kv_blocks,
    RT: tl.constexpr,
    STRIDE: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Rows are handled one at a time (1-D tiles only): the 2-D [rows, blocks] form of this
    # reduction crashes Triton 3.6's TritonGPUOptimizeThreadLocality pass on sm_90.
    slot = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(qb_seq_ptr + slot)
    srow_out = score_ptr + slot.to(tl.int64) * stride_si + h * stride_sh
    offs_k = tl.arange(0, BLOCK_K)
    if b < 0:
        for k0 in range(0, num_kv_blocks, BLOCK_K):
            kb = k0 + offs_k
            tl.store(srow_out + kb * stride_sk, tl.zeros([BLOCK_K], tl.float32),
                     mask=kb < num_kv_blocks)
        return
    i = tl.load(qb_idx_ptr + slot)
    seq_len, _, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    # The block's strided rows i*R .. i*R+R-1 are consecutive row slots.
    srow0 = i * R
    row_slot0 = (tl.load(seq_slot0_ptr + b) + srow0 // RT - tl.load(seq_first_ptr + b)) * RT \
        + srow0 % RT
    lrow0 = lse_ptr + h.to(tl.int64) * stride_lh + row_slot0.to(tl.int64) * stride_lr
    n = i + 1
    r_idx = tl.arange(0, R_PAD)
    row_lse = tl.zeros([R_PAD], dtype=tl.float32)
    n_rows = 0.0
    for r in tl.static_range(R):
        srow = srow0 + r
        ok_r = (srow * STRIDE + STRIDE - 1 >= chunk_start) & (srow * STRIDE < seq_len)
        m = -1.0e30
        for k0 in range(0, n, BLOCK_K):
            kb = k0 + offs_k
            x = tl.load(lrow0 + r * stride_lr + kb * stride_lk, mask=(kb < n) & ok_r,
                        other=float("-inf"))
            m = tl.maximum(m, tl.max(x, 0))
        ssum = 0.0
        for k0 in range(0, n, BLOCK_K):
            kb = k0 + offs_k
            x = tl.load(lrow0 + r * stride_lr + kb * stride_lk, mask=(kb < n) & ok_r,
                        other=float("-inf"))
            ssum += tl.sum(tl.exp2(x - m), 0)
        lse_r = m + tl.log2(tl.maximum(ssum, 1.0e-30))
        row_lse = tl.where(r_idx == r, lse_r, row_lse)
        n_rows += ok_r.to(tl.float32)
    inv_rows = 1.0 / tl.maximum(n_rows, 1.0)
    for k0 in range(0, num_kv_blocks, BLOCK_K):
        kb = k0 + offs_k
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for r in tl.static_range(R):
            srow = srow0 + r
            ok_r = (srow * STRIDE + STRIDE - 1 >= chunk_start) & (srow * STRIDE < seq_len)
            lse_r = tl.sum(tl.where(r_idx == r, row_lse, 0.0), 0)
            x = tl.load(lrow0 + r * stride_lr + kb * stride_lk, mask=(kb < n) & ok_r,
                        other=float("-inf"))
            acc += tl.exp2(x - lse_r)
        tl.store(srow_out + kb * stride_sk, acc * inv_rows, mask=kb < num_kv_blocks)


# (rows, strided columns per step, warps); H100, 16K chunk at 128K, S=8: 64/128/4 -> 8.7 ms,
# 128/64/8 -> 13.6 ms. Module-level so a benchmark can A/B them.
_SCORE_TILE = {"rows": 64, "block_c": 128, "num_warps": 4}


def _score_tiles(block_size: int, stride: int, group: int) -> dict:
    g_pad = next_power_of_2(group)
    rt = max(1, _SCORE_TILE["rows"] // g_pad)
    if rt * g_pad < 16:
        rt = 16 // g_pad
    r = block_size // stride
    block_c = max(_SCORE_TILE["block_c"], r)
    return {"G_PAD": g_pad, "RT": rt, "R": r, "BLOCK_C": block_c}


def xattention_block_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    stride: int,
    scale: float | None = None,
) -> torch.Tensor:
    """fp32 ``[meta.num_q_blocks, Hq, meta.max_kv_blocks]``: XAttention block probabilities.

    q ``[num_tokens, Hq, D]``, k_cache ``[num_pages, page_size, Hkv, D]`` (any strides). Row
    ``(slot, head)`` sums to 1 over the causal key blocks ``0..i``; zeros elsewhere.
    """
    bs = meta.block_size
    if stride < 1 or bs % stride:
        raise ValueError(f"xattn stride {stride} must divide block_size {bs}")
    num_tokens, hq, d = q.shape
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cfg = _score_tiles(bs, stride, group)
    rt = cfg["RT"]
    tile_tokens = rt * stride
    n_tiles = max(max_tiles(meta.num_tokens, meta.batch_size, tile_tokens), 1)
    tiles = chunk_tiles(meta.query_start_loc, meta.seq_lens, tile_tokens, n_tiles)
    nkb = meta.max_kv_blocks
    lse = torch.empty(hq, n_tiles * rt, nkb, device=q.device, dtype=torch.float32)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _xattn_strided_lse_kernel[(n_tiles, hkv)](
        q, k_cache, block_table, meta.seq_lens, meta.query_start_loc,
        tiles["seq"], tiles["idx"],
        lse,
        scale / stride * _LOG2E,
        n_tiles,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(),
        block_table.stride(0),
        lse.stride(0), lse.stride(1), lse.stride(2),
        nkb,
        G=group, G_PAD=cfg["G_PAD"], RT=rt, STRIDE=stride, R=cfg["R"],
        BLOCK_C=cfg["BLOCK_C"], HEAD_DIM=d, PAGE_SIZE=page_size,
        DOT_PRECISION=dot_precision,
        UPCAST=interpret_upcast(q.dtype),
        num_warps=_SCORE_TILE["num_warps"] if rt * cfg["G_PAD"] >= 128 else 4,
        num_stages=2,
    )
    scores = torch.empty(meta.num_q_blocks, hq, nkb, device=q.device, dtype=torch.float32)
    r = cfg["R"]
    _xattn_block_scores_kernel[(meta.num_q_blocks, hq)](
        lse, scores,
        meta.q_block_seq, meta.q_block_idx, meta.seq_lens, meta.query_start_loc,
        tiles["seq_first"], tiles["seq_slot0"],
        lse.stride(0), lse.stride(1), lse.stride(2),
        scores.stride(0), scores.stride(1), scores.stride(2),
        nkb,
        RT=rt, STRIDE=stride, R=r, R_PAD=next_power_of_2(r),
        BLOCK_K=min(next_power_of_2(nkb), 2048),
        num_warps=4,
    )
    return scores


def estimate_xattention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    threshold: float,
    stride: int,
    scale: float | None = None,
) -> PrefillBlockLists:
    """XAttention lists ``[meta.num_q_blocks, Hkv, meta.max_kv_blocks]`` + counts + density.

    ``threshold`` in (0, 1]: cumulative block probability to keep per query head (1.0 keeps every
    causal block); ``stride``: antidiagonal stride, divides ``meta.block_size``.
    """
    hkv = k_cache.shape[2]
    if threshold >= 1.0:  # everything is kept: skip the scoring
        from sparse_kernels.block_sparse_prefill import all_causal_block_lists

        return all_causal_block_lists(meta, hkv)
    scores = xattention_block_scores(q, k_cache, block_table, meta, stride=stride, scale=scale)
    return build_block_lists(meta, hkv, scores=scores, threshold=threshold)

"""MInference vertical-slash block selection for sparse prefill.

From the last ``vs_last_q`` queries of each chunk (``last_q_scores``): per query head, keep the
``vs_vertical`` key columns with the largest summed attention (vertical lines) and the
``vs_slash`` diagonal offsets with the largest summed attention (slash lines). A radix select
over many programs (``radix_select``) finds each row's cut and ``vs_select_blocks`` marks the
kept columns and diagonals straight into block maps (ties: lowest index first); the torch path,
``vertical_slash_indices`` (a stable sort) and the two conversions below, is its reference.

Block-granular approximation: MInference's own kernel computes exactly the kept columns and
diagonals (index-based sparse attention). Here they are converted to key blocks for the
block-sparse kernel: key block ``j`` is kept for query block ``i`` when it contains a kept column,
or when a kept diagonal ``d`` crosses the full ``B x B`` block square ``(i, j)``, i.e.
``d // B == i - j`` or (``d // B == i - j - 1`` and ``d % B > 0``). Whole blocks are computed, so
the result attends to a superset of MInference's positions (more accurate, denser: report the
density). Blocks ``0`` and ``i`` are always kept; lists are the union over each GQA group.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta
from sparse_kernels.host_math import next_power_of_2
from sparse_kernels.last_q_scores import last_q_score_planes
from sparse_kernels.radix_select import (
    DEFAULT_CHUNK,
    DEFAULT_DIGIT_BITS,
    radix_chunk_keep,
    radix_select_cut,
)

__all__ = [
    "vertical_slash_indices",
    "vertical_index_blocks",
    "slash_index_bands",
    "vs_select_blocks",
    "estimate_vertical_slash",
]


def vertical_slash_indices(
    vertical: torch.Tensor, slash: torch.Tensor, seq_lens: torch.Tensor, n_vertical: int,
    n_slash: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top columns / diagonal offsets, int64 ``[B, Hq, k]``; ``-1`` marks padding (k > seq_len).
    Torch, the reference of :func:`vs_select_blocks` (a stable sort: among equal scores the
    lowest index first, as the radix select)."""
    width = vertical.shape[-1]
    valid = torch.arange(width, device=vertical.device)[None, :] < seq_lens[:, None].long()
    out = []
    for x, k in ((vertical, n_vertical), (slash, n_slash)):
        k = min(k, width)
        if k <= 0:
            out.append(torch.full((*x.shape[:2], 1), -1, device=x.device, dtype=torch.int64))
            continue
        val, idx = torch.sort(torch.where(valid[:, None, :], x, -1.0), dim=-1, descending=True,
                              stable=True)
        val, idx = val[..., :k], idx[..., :k]
        out.append(torch.where(val >= 0, idx, -1))
    return out[0], out[1]


def vertical_index_blocks(v_idx: torch.Tensor, block_size: int, num_kv_blocks: int) -> torch.Tensor:
    """int8 ``[B, Hq, num_kv_blocks]``: 1 where the key block holds a kept column (torch;
    the reference of :func:`vs_select_blocks`)."""
    b, h, _ = v_idx.shape
    out = torch.zeros(b, h, num_kv_blocks + 1, device=v_idx.device, dtype=torch.int8)
    blk = torch.where(v_idx >= 0, v_idx // block_size, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, blk, 1)
    return out[..., :num_kv_blocks]


def slash_index_bands(s_idx: torch.Tensor, block_size: int, num_kv_blocks: int) -> torch.Tensor:
    """int8 ``[B, Hq, num_kv_blocks]``: 1 at block offset ``δ = i - j`` crossed by a kept diagonal
    (torch; the reference of :func:`vs_select_blocks`)."""
    b, h, _ = s_idx.shape
    out = torch.zeros(b, h, num_kv_blocks + 1, device=s_idx.device, dtype=torch.int8)
    ok = s_idx >= 0
    a = torch.where(ok, s_idx // block_size, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, a, 1)
    a1 = torch.where(ok & (s_idx % block_size > 0), a + 1, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, a1, 1)
    return out[..., :num_kv_blocks]


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["num_kv_blocks", "heads", "stride_xp", "stride_xr", "stride_sp",
                       "stride_sr", "stride_hp", "stride_hr", "stride_hc", "stride_op",
                       "stride_or"],
    do_not_specialize_on_alignment=["seq_lens_ptr"],
)
def _vs_mark_kernel(
    x_ptr,  # fp32 [2, B * Hq, width]: vertical, slash
    seq_lens_ptr, state_ptr, hist_ptr,
    out_ptr,  # int8 [2, B * Hq, num_kv_blocks]: kept key blocks, crossed block offsets
    num_kv_blocks, heads,
    stride_xp, stride_xr,
    stride_sp, stride_sr,
    stride_hp, stride_hr, stride_hc,
    stride_op, stride_or,
    BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    LAST_NBITS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)  # (sequence, query head)
    p = tl.program_id(2)  # 0: columns, 1: diagonals
    length = tl.load(seq_lens_ptr + r // heads)
    if c * CHUNK >= length:
        return
    idx, keep = radix_chunk_keep(x_ptr + p * stride_xp + r.to(tl.int64) * stride_xr,
                                 state_ptr + p * stride_sp + r * stride_sr,
                                 hist_ptr + p * stride_hp + r * stride_hr, stride_hc, c, length,
                                 CHUNK, LAST_NBITS, MAX_CHUNKS)
    blk = idx // BLOCK_SIZE
    out = out_ptr + p * stride_op + r.to(tl.int64) * stride_or
    one = tl.full([CHUNK], 1, tl.int8)
    tl.store(out + blk, one, mask=keep & (blk < num_kv_blocks))
    if p == 1:  # a diagonal off a block edge also crosses the next block offset
        tl.store(out + blk + 1, one,
                 mask=keep & (idx % BLOCK_SIZE > 0) & (blk + 1 < num_kv_blocks))


def vs_select_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, n_vertical: int, n_slash: int,
                     block_size: int, num_kv_blocks: int, *, chunk: int = DEFAULT_CHUNK,
                     digit_bits: int = DEFAULT_DIGIT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical_blocks, slash_bands)`` int8 ``[B, Hq, num_kv_blocks]`` from the score planes
    ``[2, B, Hq, width]`` (``last_q_score_planes``): the top ``n_vertical`` columns and
    ``n_slash`` diagonals of each row within its ``seq_len``, marked as blocks. Launches: the
    maps' zeroing, the radix select's ``2 x levels``, one marking. Reference:
    :func:`vertical_slash_indices`, then :func:`vertical_index_blocks` and
    :func:`slash_index_bands`."""
    _, b, h, width = scores.shape
    x = scores.reshape(2, b * h, width)  # a view of last_q_score_planes' output
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.zeros(2, b * h, num_kv_blocks, device=scores.device, dtype=torch.int8)
    chunk = min(chunk, max(16, next_power_of_2(width)))
    if b * h and width:
        cut = radix_select_cut(x, seq_lens, h, (max(0, n_vertical), max(0, n_slash)),
                               chunk=chunk, digit_bits=digit_bits)
        _vs_mark_kernel[(cut.max_chunks, b * h, 2)](
            x, seq_lens, cut.state, cut.hist, out,
            num_kv_blocks, h,
            x.stride(0), x.stride(1),
            cut.state.stride(0), cut.state.stride(1),
            cut.hist.stride(0), cut.hist.stride(1), cut.hist.stride(2),
            out.stride(0), out.stride(1),
            BLOCK_SIZE=block_size, CHUNK=chunk, LAST_NBITS=cut.last_nbits,
            MAX_CHUNKS=max(2, next_power_of_2(cut.max_chunks)),
            num_warps=4,
        )
    out = out.view(2, b, h, num_kv_blocks)
    return out[0], out[1]


def estimate_vertical_slash(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    last_q: int,
    n_vertical: int,
    n_slash: int,
    scale: float | None = None,
) -> PrefillBlockLists:
    """Vertical-slash lists ``[meta.num_q_blocks, Hkv, meta.max_kv_blocks]`` + counts + density.

    q ``[num_tokens, Hq, D]``, k_cache ``[num_pages, page_size, Hkv, D]``; ``last_q``,
    ``n_vertical``, ``n_slash`` = config ``vs_last_q``, ``vs_vertical``, ``vs_slash``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = last_q_score_planes(q, k_cache, block_table, meta, last_q=last_q, scale=scale)
    vertical_blocks, slash_bands = vs_select_blocks(scores, meta.seq_lens, n_vertical, n_slash,
                                                    meta.block_size, meta.max_kv_blocks)
    return build_block_lists(meta, k_cache.shape[2], vertical_blocks=vertical_blocks,
                             slash_bands=slash_bands)

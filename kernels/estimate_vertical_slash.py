"""MInference vertical-slash block selection for sparse prefill.

From the last ``vs_last_q`` queries of each chunk (``last_q_scores``): per query head, keep the
``vs_vertical`` key columns with the largest summed attention (vertical lines) and the
``vs_slash`` diagonal offsets with the largest summed attention (slash lines), by ``torch.topk``.

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
from sparse_kernels.last_q_scores import last_q_scores

__all__ = [
    "vertical_slash_indices",
    "vertical_index_blocks",
    "slash_index_bands",
    "vs_block_maps",
    "estimate_vertical_slash",
]


def vertical_slash_indices(
    vertical: torch.Tensor, slash: torch.Tensor, seq_lens: torch.Tensor, n_vertical: int,
    n_slash: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top columns / diagonal offsets, int64 ``[B, Hq, k]``; ``-1`` marks padding (k > seq_len)."""
    width = vertical.shape[-1]
    valid = torch.arange(width, device=vertical.device)[None, :] < seq_lens[:, None].long()
    out = []
    for x, k in ((vertical, n_vertical), (slash, n_slash)):
        k = min(k, width)
        if k <= 0:
            out.append(torch.full((*x.shape[:2], 1), -1, device=x.device, dtype=torch.int64))
            continue
        val, idx = torch.topk(torch.where(valid[:, None, :], x, -1.0), k, dim=-1)
        out.append(torch.where(val >= 0, idx, -1))
    return out[0], out[1]


def vertical_index_blocks(v_idx: torch.Tensor, block_size: int, num_kv_blocks: int) -> torch.Tensor:
    """int8 ``[B, Hq, num_kv_blocks]``: 1 where the key block holds a kept column (torch;
    the reference of :func:`vs_block_maps`)."""
    b, h, _ = v_idx.shape
    out = torch.zeros(b, h, num_kv_blocks + 1, device=v_idx.device, dtype=torch.int8)
    blk = torch.where(v_idx >= 0, v_idx // block_size, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, blk, 1)
    return out[..., :num_kv_blocks]


def slash_index_bands(s_idx: torch.Tensor, block_size: int, num_kv_blocks: int) -> torch.Tensor:
    """int8 ``[B, Hq, num_kv_blocks]``: 1 at block offset ``δ = i - j`` crossed by a kept diagonal
    (torch; the reference of :func:`vs_block_maps`)."""
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
    do_not_specialize=["n_v", "n_s", "num_kv_blocks", "stride_vi", "stride_si", "stride_o"],
    do_not_specialize_on_alignment=["band_ptr"],  # out[1]: B * Hq * num_kv_blocks bytes in
)
def _vs_block_maps_kernel(
    v_idx_ptr, s_idx_ptr, vert_ptr, band_ptr,
    n_v, n_s, num_kv_blocks,
    stride_vi, stride_si, stride_o,
    BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)  # one (sequence, query head)
    offs = tl.arange(0, CHUNK)
    one = tl.full([CHUNK], 1, tl.int8)
    for c in range(0, n_v, CHUNK):
        i = tl.load(v_idx_ptr + row * stride_vi + c + offs, mask=c + offs < n_v, other=-1)
        blk = i // BLOCK_SIZE
        tl.store(vert_ptr + row * stride_o + blk, one, mask=(i >= 0) & (blk < num_kv_blocks))
    for c in range(0, n_s, CHUNK):
        i = tl.load(s_idx_ptr + row * stride_si + c + offs, mask=c + offs < n_s, other=-1)
        a = i // BLOCK_SIZE
        tl.store(band_ptr + row * stride_o + a, one, mask=(i >= 0) & (a < num_kv_blocks))
        # a diagonal off a block edge also crosses the next block offset
        tl.store(band_ptr + row * stride_o + a + 1, one,
                 mask=(i >= 0) & (i % BLOCK_SIZE > 0) & (a + 1 < num_kv_blocks))


def vs_block_maps(v_idx: torch.Tensor, s_idx: torch.Tensor, block_size: int,
                  num_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical_index_blocks(v_idx, ...), slash_index_bands(s_idx, ...))`` in one launch
    (those two torch functions are its reference: about twenty small launches together)."""
    b, h, n_v = v_idx.shape
    n_s = s_idx.shape[-1]
    out = torch.zeros(2, b, h, num_kv_blocks, device=v_idx.device, dtype=torch.int8)
    v_idx = v_idx.reshape(b * h, n_v)
    s_idx = s_idx.reshape(b * h, n_s)
    if b * h:
        _vs_block_maps_kernel[(b * h,)](
            v_idx, s_idx, out[0], out[1], n_v, n_s, num_kv_blocks,
            v_idx.stride(0), s_idx.stride(0), num_kv_blocks,
            BLOCK_SIZE=block_size, CHUNK=min(1024, max(16, next_power_of_2(max(n_v, n_s)))),
            num_warps=4,
        )
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
    vertical, slash = last_q_scores(q, k_cache, block_table, meta, last_q=last_q, scale=scale)
    v_idx, s_idx = vertical_slash_indices(vertical, slash, meta.seq_lens, n_vertical, n_slash)
    vertical_blocks, slash_bands = vs_block_maps(v_idx, s_idx, meta.block_size,
                                                 meta.max_kv_blocks)
    return build_block_lists(meta, k_cache.shape[2], vertical_blocks=vertical_blocks,
                             slash_bands=slash_bands)

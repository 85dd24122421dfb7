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

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta
from sparse_kernels.last_q_scores import last_q_scores

__all__ = [
    "vertical_slash_indices",
    "vertical_index_blocks",
    "slash_index_bands",
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
    """int8 ``[B, Hq, num_kv_blocks]``: 1 where the key block holds a kept column."""
    b, h, _ = v_idx.shape
    out = torch.zeros(b, h, num_kv_blocks + 1, device=v_idx.device, dtype=torch.int8)
    blk = torch.where(v_idx >= 0, v_idx // block_size, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, blk, 1)
    return out[..., :num_kv_blocks]


def slash_index_bands(s_idx: torch.Tensor, block_size: int, num_kv_blocks: int) -> torch.Tensor:
    """int8 ``[B, Hq, num_kv_blocks]``: 1 at block offset ``δ = i - j`` crossed by a kept diagonal."""
    b, h, _ = s_idx.shape
    out = torch.zeros(b, h, num_kv_blocks + 1, device=s_idx.device, dtype=torch.int8)
    ok = s_idx >= 0
    a = torch.where(ok, s_idx // block_size, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, a, 1)
    a1 = torch.where(ok & (s_idx % block_size > 0), a + 1, num_kv_blocks).clamp(max=num_kv_blocks)
    out.scatter_(2, a1, 1)
    return out[..., :num_kv_blocks]


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
    nkb = meta.max_kv_blocks
    return build_block_lists(
        meta, k_cache.shape[2],
        vertical_blocks=vertical_index_blocks(v_idx, meta.block_size, nkb),
        slash_bands=slash_index_bands(s_idx, meta.block_size, nkb),
    )

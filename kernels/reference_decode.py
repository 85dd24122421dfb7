"""PyTorch references for the decode kernels (page summaries, Quest scores, top-k selection,
sparse paged decode). Slow and obvious on purpose; built on ``reference.py``.
"""

from __future__ import annotations

import math

import torch

from sparse_kernels.page_select import DENSE_ROW
from sparse_kernels.reference import attention_with_mask, gather_kv


def ref_page_summaries(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    summaries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Min / max of the valid keys of every page of every sequence.

    Returns ``[num_pages, 2, num_kv_heads, head_dim]`` in ``k_cache.dtype``: a copy of
    ``summaries`` (or NaN where ``None``) with the pages of the given sequences overwritten.
    """
    num_pages, page, h, d = k_cache.shape
    if summaries is None:
        out = torch.full((num_pages, 2, h, d), float("nan"), dtype=k_cache.dtype)
    else:
        out = summaries.clone()
    for b, s in enumerate(seq_lens.tolist()):
        for j in range(-(-s // page)):
            phys = int(block_table[b, j])
            n = min(page, s - j * page)
            keys = k_cache[phys, :n]  # [n, H, D]
            out[phys, 0] = keys.amin(dim=0)
            out[phys, 1] = keys.amax(dim=0)
    return out


def ref_write_kv_and_summaries(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    summaries: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, summaries) after :func:`sparse_kernels.kv_write.write_kv_and_summaries`
    (copies): every token with a slot written; the summary of each page that exactly one
    token of the step writes recomputed over the page's tokens up to that one."""
    k_cache, v_cache, summaries = k_cache.clone(), v_cache.clone(), summaries.clone()
    page = k_cache.shape[1]
    slots = [int(s) for s in slot_mapping.tolist()]
    writers: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s < 0:
            continue
        k_cache[s // page, s % page] = key[t].to(k_cache.dtype)
        v_cache[s // page, s % page] = value[t].to(v_cache.dtype)
        writers.setdefault(s // page, []).append(t)
    for p, ts in writers.items():
        if len(ts) == 1:
            keys = k_cache[p, : slots[ts[0]] % page + 1]  # [n, H, D]
            summaries[p, 0] = keys.amin(dim=0)
            summaries[p, 1] = keys.amax(dim=0)
    return k_cache, v_cache, summaries


def ref_page_scores(
    q: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> torch.Tensor:
    """Raw Quest scores, fp32 ``[batch, num_kv_heads, max_pages]``, ``-inf`` beyond the sequence.

    score = sum over the group's query heads and d of max(q*min, q*max).
    """
    batch, hq, d = q.shape
    hkv = summaries.shape[2]
    g = hq // hkv
    max_pages = block_table.shape[1]
    scores = torch.full((batch, hkv, max_pages), float("-inf"), dtype=torch.float32)
    for b, s in enumerate(seq_lens.tolist()):
        n_pages = -(-s // page_size)
        for j in range(n_pages):
            summ = summaries[int(block_table[b, j])].float()  # [2, Hkv, D]
            for h in range(hkv):
                qg = q[b, h * g : (h + 1) * g].float()  # [g, D]
                a = qg * summ[0, h][None]
                c = qg * summ[1, h][None]
                scores[b, h, j] = torch.maximum(a, c).sum()
    return scores


def ref_select_from_scores(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    local_pages: int,
    dense_pages: int = 0,
) -> torch.Tensor:
    """Top-k selection from raw scores: forced sink/local pages, then the best-scoring others.

    Returns int32 ``[batch, num_kv_heads, num_select]``, ascending, ``-1`` padding at the end;
    a sequence of ``num_select < n_pages <= dense_pages`` pages gets ``[DENSE_ROW, -1, ...]``.
    """
    batch, hkv, _ = scores.shape
    out = torch.full((batch, hkv, num_select), -1, dtype=torch.int32)
    for b, s in enumerate(seq_lens.tolist()):
        n_pages = -(-s // page_size)
        for h in range(hkv):
            if n_pages <= num_select:
                chosen = list(range(n_pages))
            elif n_pages <= dense_pages:
                out[b, h, 0] = DENSE_ROW
                continue
            else:
                forced = {j for j in range(n_pages) if j < sink_pages or j >= n_pages - local_pages}
                rest = sorted((j for j in range(n_pages) if j not in forced),
                              key=lambda j: -float(scores[b, h, j]))
                chosen = sorted(forced) + rest[: num_select - len(forced)]
            chosen = sorted(chosen)
            out[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def ref_select_pages(
    q: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    local_pages: int,
    dense_pages: int = 0,
) -> torch.Tensor:
    """Quest top-k page selection (see :func:`ref_select_from_scores`)."""
    scores = ref_page_scores(q, summaries, block_table, seq_lens, page_size)
    return ref_select_from_scores(scores, seq_lens, page_size, num_select, sink_pages,
                                  local_pages, dense_pages)


def ref_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention restricted to the tokens of the selected logical pages.

    q ``[batch, Hq, D]``; ``selected`` int32 ``[batch, Hkv, k]`` (``-1`` = none; a row starting
    with ``DENSE_ROW``: all pages) or ``None`` (all pages). Returns fp32 ``[batch, Hq, D]``.
    """
    batch, hq, d = q.shape
    page = k_cache.shape[1]
    hkv = k_cache.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros((batch, hq, d), dtype=torch.float32)
    for b, s in enumerate(seq_lens.tolist()):
        if s == 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_table, b, s)
        tok_page = torch.arange(s) // page
        mask = torch.zeros((hq, 1, s), dtype=torch.bool)
        for h in range(hkv):
            if selected is None or (selected.shape[-1] and int(selected[b, h, 0]) == DENSE_ROW):
                keep = torch.ones(s, dtype=torch.bool)
            else:
                pages = selected[b, h]
                pages = pages[pages >= 0].long()
                keep = torch.isin(tok_page, pages)
            mask[h * g : (h + 1) * g, 0] = keep
        out[b] = attention_with_mask(q[b : b + 1], k, v, mask, scale)[0]
    return out

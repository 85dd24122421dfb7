"""Quest page scoring and top-k page selection for sparse decode.

score(page) = sum over the query heads g of the GQA group, sum over d of
              max(q[g, d] * min[page, d], q[g, d] * max[page, d])

Because ``max >= min``, ``max(q*mn, q*mx) = relu(q)*mx + min(q, 0)*mn``, so the group sum
collapses to two vectors per KV head: ``score = q_pos . mx + q_neg . mn`` with
``q_pos = sum_g relu(q_g)`` and ``q_neg = sum_g min(q_g, 0)`` (exact algebra; fp32 math).

Pipeline (all on device, static shapes, no host sync, CUDA-graph safe):

1. :func:`score_pages` -- Triton kernel, grid ``(cdiv(max_pages, BLOCK_P), batch, num_kv_heads)``,
   writes ``scores [batch, num_kv_heads, max_pages]`` fp32: ``-inf`` beyond the sequence,
   ``+inf`` for the forced sink (first ``sink_pages``) and local (last ``local_pages``,
   counting the partially filled last page) pages.
2. :func:`topk_pages` -- Triton radix-select kernel, grid ``(batch, num_kv_heads)``: the
   ``num_select`` best pages of each row, emitted in ascending order; a sequence with at most
   ``num_select`` pages gets all of them followed by ``-1`` padding. (``method="torch"``:
   ``torch.topk`` + sort, same result up to ties.)

Selection reuse (LServe-style, optional): :func:`select_pages` can also store the raw
(un-forced) scores; on the following steps :func:`reselect_pages` re-applies the sink/local
forcing for the *current* ``seq_lens`` to those stored scores and reruns top-k, skipping the
scoring kernel (the part that reads the summaries). Pages that appeared since the scoring step
have no score and are always selected (they are normally inside the local window).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _score_pages_kernel(
    q_ptr,
    summ_ptr,
    block_table_ptr,
    seq_lens_ptr,
    scores_ptr,
    raw_ptr,
    sink_pages,
    local_pages,
    max_pages,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    stride_bt,
    stride_sc_b,
    stride_sc_h,
    stride_sc_p,
    stride_raw_b,
    stride_raw_h,
    stride_raw_p,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    STORE_RAW: tl.constexpr,
):
    pid_p = tl.program_id(0)
    seq_idx = tl.program_id(1)
    kv_head = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = (
        q_ptr
        + seq_idx.to(tl.int64) * stride_q_b
        + (kv_head * GROUP + offs_g[:, None]) * stride_q_h
        + offs_d[None, :] * stride_q_d
    )
    q = tl.load(q_ptrs, mask=(offs_g[:, None] < GROUP) & mask_d[None, :], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)  # [HEAD_DIM_PAD]
    q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = offs_p < n_pages
    phys = tl.load(block_table_ptr + seq_idx.to(tl.int64) * stride_bt + offs_p, mask=valid, other=0)
    s_ptrs = (
        summ_ptr
        + phys.to(tl.int64)[:, None] * stride_s_page
        + kv_head * stride_s_head
        + offs_d[None, :] * stride_s_dim
    )
    mask = valid[:, None] & mask_d[None, :]
    k_min = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    k_max = tl.load(s_ptrs + stride_s_kind, mask=mask, other=0.0).to(tl.float32)
    score = tl.sum(q_pos[None, :] * k_max + q_neg[None, :] * k_min, axis=1)  # [BLOCK_P]
    score = tl.where(valid, score, float("-inf"))

    in_range = offs_p < max_pages
    if STORE_RAW:
        tl.store(
            raw_ptr + seq_idx.to(tl.int64) * stride_raw_b + kv_head * stride_raw_h
            + offs_p * stride_raw_p,
            score,
            mask=in_range,
        )
    forced = valid & ((offs_p < sink_pages) | (offs_p >= n_pages - local_pages))
    score = tl.where(forced, float("inf"), score)
    tl.store(
        scores_ptr + seq_idx.to(tl.int64) * stride_sc_b + kv_head * stride_sc_h
        + offs_p * stride_sc_p,
        score,
        mask=in_range,
    )


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
    num_warps: int = 8,
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
        block_p, num_warps: launch tuning (pages per program, warps).

    Returns:
        fp32 ``[batch, num_kv_heads, max_pages]``: ``-inf`` beyond the sequence, ``+inf`` for
        forced pages, the Quest score otherwise.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = summaries.shape[2]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    assert summaries.shape[3] == head_dim, (summaries.shape, q.shape)
    group = num_q_heads // num_kv_heads
    max_pages = block_table.shape[1]
    if scores is None:
        scores = torch.empty((batch, num_kv_heads, max_pages), dtype=torch.float32,
                             device=q.device)
    raw = scores if raw_scores is None else raw_scores
    if batch == 0 or max_pages == 0:
        return scores
    block_p = min(block_p or 64, triton.next_power_of_2(max_pages))
    grid = (triton.cdiv(max_pages, block_p), batch, num_kv_heads)
    _score_pages_kernel[grid](
        q, summaries, block_table, seq_lens, scores, raw,
        sink_pages, local_pages, max_pages,
        *q.stride(), *summaries.stride(), block_table.stride(0),
        *scores.stride(), *raw.stride(),
        PAGE_SIZE=page_size,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_P=block_p,
        STORE_RAW=raw_scores is not None,
        num_warps=num_warps,
    )
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
def _radix_pass(row, stride_p, n_pages, prefix, remaining, SHIFT: tl.constexpr,
                BLOCK: tl.constexpr):
    """One 8-bit radix-select pass over the keys whose bits above SHIFT+8 equal ``prefix``'s:
    fixes the digit at SHIFT of the ``remaining``-th largest key among them."""
    offs_b = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(0, n_pages, BLOCK):
        offs = start + offs_b
        m = offs < n_pages
        key = _order_key(tl.load(row + offs * stride_p, mask=m, other=0.0))
        if SHIFT < 24:
            m = m & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = ((key >> SHIFT) & 255).to(tl.int32)
        hist += tl.histogram(digit, 256, mask=m)
    cum_ge = tl.cumsum(hist, 0, reverse=True)  # keys with digit >= d
    d_star = tl.max(tl.where(cum_ge >= remaining, bins, -1), axis=0)
    remaining -= tl.sum(tl.where(bins > d_star, hist, 0), axis=0)
    prefix = prefix | (d_star.to(tl.uint32) << SHIFT)
    return prefix, remaining


@triton.jit
def _topk_pages_kernel(
    scores_ptr,
    seq_lens_ptr,
    sel_ptr,
    num_select,
    stride_sc_b,
    stride_sc_h,
    stride_sc_p,
    stride_sel_b,
    stride_sel_h,
    stride_sel_k,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Top-``num_select`` of the first ``n_pages`` scores of one (sequence, KV head) row.

    Radix select on the order-preserving uint32 keys (4 passes of 8 bits, histogram per
    pass) finds the k-th largest key T; an in-order compaction pass then emits every page
    with key > T and the first pages with key == T, so the output is sorted ascending.
    """
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    row = scores_ptr + seq_idx.to(tl.int64) * stride_sc_b + kv_head * stride_sc_h
    out = sel_ptr + seq_idx.to(tl.int64) * stride_sel_b + kv_head * stride_sel_h
    offs_b = tl.arange(0, BLOCK)

    if n_pages <= num_select:
        # Short sequence: every page, then -1 padding.
        for start in range(0, num_select, BLOCK):
            offs = start + offs_b
            tl.store(out + offs * stride_sel_k, tl.where(offs < n_pages, offs, -1),
                     mask=offs < num_select)
    else:
        prefix = tl.zeros([], dtype=tl.uint32)
        remaining = num_select  # how many still to take at/below the current prefix
        prefix, remaining = _radix_pass(row, stride_sc_p, n_pages, prefix, remaining, 24, BLOCK)
        prefix, remaining = _radix_pass(row, stride_sc_p, n_pages, prefix, remaining, 16, BLOCK)
        prefix, remaining = _radix_pass(row, stride_sc_p, n_pages, prefix, remaining, 8, BLOCK)
        prefix, remaining = _radix_pass(row, stride_sc_p, n_pages, prefix, remaining, 0, BLOCK)
        # prefix is now the k-th largest key; take keys > prefix, then `remaining` ties.
        taken = 0
        ties = 0
        for start in range(0, n_pages, BLOCK):
            offs = start + offs_b
            m = offs < n_pages
            key = _order_key(tl.load(row + offs * stride_sc_p, mask=m, other=0.0))
            gt = (m & (key > prefix)).to(tl.int32)
            eq = (m & (key == prefix)).to(tl.int32)
            eq_rank = ties + tl.cumsum(eq, 0) - eq
            take = gt | (eq & (eq_rank < remaining).to(tl.int32))
            pos = taken + tl.cumsum(take, 0) - take
            tl.store(out + pos * stride_sel_k, offs, mask=take != 0)
            taken += tl.sum(take, axis=0)
            ties += tl.sum(eq, axis=0)


def topk_pages(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    out: torch.Tensor | None = None,
    method: str = "triton",
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Top-``num_select`` logical pages of each row of ``scores``, sorted ascending.

    Args:
        scores: fp32 ``[batch, num_kv_heads, max_pages]``; only the first
            ``cdiv(seq_lens[b], page_size)`` pages of row ``b`` are candidates.
        seq_lens: int32 ``[batch]``.
        out: optional int32 ``[batch, num_kv_heads, num_select]``.
        method: ``"triton"`` (one radix-select kernel, grid ``(batch, num_kv_heads)``) or
            ``"torch"`` (``torch.topk`` + sort).
    Returns:
        int32 ``[batch, num_kv_heads, num_select]``: a row with fewer than ``num_select``
        pages holds all of them followed by ``-1``. Static shapes, no host sync.
    """
    batch, num_kv_heads, max_pages = scores.shape
    if out is None:
        out = torch.empty((batch, num_kv_heads, num_select), dtype=torch.int32,
                          device=scores.device)
    if method == "torch":
        out.copy_(_topk_pages_torch(scores, seq_lens, page_size, num_select))
        return out
    if batch == 0 or num_select == 0:
        return out
    _topk_pages_kernel[(batch, num_kv_heads)](
        scores, seq_lens, out, num_select,
        *scores.stride(), *out.stride(),
        PAGE_SIZE=page_size,
        # Measured on an H100 (rows of 2048 / 8192 pages: ~17 / ~36 us per launch, latency
        # bound, vs ~60-110 us for torch.topk + sort): one block of up to 4096 scores, 8 warps.
        BLOCK=block or max(256, min(4096, triton.next_power_of_2(max_pages))),
        num_warps=num_warps or 8,
    )
    return out


def _topk_pages_torch(scores, seq_lens, page_size, num_select):
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
    return idx


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
) -> torch.Tensor:
    """Quest top-k selection of logical pages for each (sequence, KV head).

    Args: see :func:`score_pages`; ``num_select`` = ``token_budget // page_size``.
        ``sink_pages + local_pages`` should not exceed ``num_select``.
        out: optional int32 ``[batch, num_kv_heads, num_select]`` output buffer.
        method: top-k implementation, see :func:`topk_pages`.

    Returns:
        ``selected`` int32 ``[batch, num_kv_heads, num_select]``: logical page indices sorted
        ascending, ``-1`` padding at the end when a sequence has fewer than ``num_select``
        pages (it then selects all of them). Sink and local pages are always included.
    """
    scores = score_pages(q, summaries, block_table, seq_lens, page_size,
                         sink_pages, local_pages, raw_scores=raw_scores)
    return topk_pages(scores, seq_lens, page_size, num_select, out=out, method=method)


def reselect_pages(
    raw_scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_select: int,
    sink_pages: int,
    local_pages: int,
    out: torch.Tensor | None = None,
    method: str = "triton",
) -> torch.Tensor:
    """Selection reuse: top-k over stored raw scores, with sink/local forced for the current
    ``seq_lens``. Pages that were beyond the sequence when the scores were taken (``-inf``) but
    exist now are forced too. No summaries are read.

    Args:
        raw_scores: fp32 ``[batch, num_kv_heads, max_pages]`` from a previous
            ``select_pages(..., raw_scores=buf)``.
        seq_lens: int32 ``[batch]``: the current lengths.
    Returns: like :func:`select_pages`.
    """
    max_pages = raw_scores.shape[-1]
    idx = torch.arange(max_pages, device=raw_scores.device)[None, :]
    n_pages = ((seq_lens.long() + page_size - 1) // page_size)[:, None]
    valid = idx < n_pages
    forced = valid & ((idx < sink_pages) | (idx >= n_pages - local_pages))
    forced = forced[:, None, :] | (valid[:, None, :] & (raw_scores == float("-inf")))
    scores = torch.where(valid[:, None, :], raw_scores, float("-inf"))
    scores = torch.where(forced, float("inf"), scores)
    return topk_pages(scores, seq_lens, page_size, num_select, out=out, method=method)


def pages_read(selected: torch.Tensor) -> torch.Tensor:
    """int32 ``[batch, num_kv_heads]``: pages attended per (sequence, KV head). Device only."""
    return (selected >= 0).sum(dim=-1, dtype=torch.int32)


def tokens_read(selected: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """int32 ``[batch, num_kv_heads]``: KV tokens attended (last page counted partially)."""
    start = selected.long() * page_size
    n = (seq_lens.long()[:, None, None] - start).clamp(0, page_size)
    n = torch.where(selected >= 0, n, 0)
    return n.sum(dim=-1).to(torch.int32)


def density(selected: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """fp32 ``[batch, num_kv_heads]``: tokens attended / seq_len (1.0 = dense). Device only."""
    t = tokens_read(selected, seq_lens, page_size).float()
    return t / seq_lens.float().clamp_min(1)[:, None]

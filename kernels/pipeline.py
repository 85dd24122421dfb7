"""The sparse attention steps both engine adapters run, engine-agnostic.

* :func:`decode_attention` -- one query token per sequence: Quest page selection (or all pages)
  then split-KV paged decode. Static shapes, no host sync: safe inside CUDA graphs.
* :func:`sparse_prefill_attention` -- a ragged batch of prefill chunks: one estimator builds
  per-(query block, KV head) key-block lists, then block-sparse flash attention. Eager only.

Page summaries are updated by the adapter right after the engine writes K/V
(:func:`sparse_kernels.page_summary.update_page_summaries`), for every token of the step.
"""

from __future__ import annotations

import torch

from sparse_kernels.block_sparse_prefill import (
    PrefillBlockLists,
    PrefillBlockMeta,
    all_causal_block_lists,
    block_density,
    block_sparse_prefill_attention,
)
from sparse_kernels.config import SparseConfig
from sparse_kernels.page_select import SelectWorkspace, select_pages
from sparse_kernels.sparse_decode import DecodeWorkspace, sparse_decode


def decode_budget_pages(cfg: SparseConfig, page_size: int) -> tuple[int, int, int]:
    """(pages selected, sink pages, local pages) for a page size; cfg.check_model validated it."""
    return (cfg.token_budget // page_size, -(-cfg.sink_tokens // page_size),
            -(-cfg.local_tokens // page_size))


def decode_attention(
    method: str,
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    selected: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    select_workspace: SelectWorkspace | None = None,
) -> torch.Tensor | None:
    """Decode attention of ``q [B, Hq, D]`` into ``out``; returns the page selection (topk).

    ``method`` "topk": each (sequence, KV head) reads its top ``token_budget`` tokens' pages
    (sink and local pages always; sequences with fewer pages read all of them). "dense": all
    pages. ``selected`` is an optional preallocated int32 ``[>=B, Hkv, k]`` buffer.
    """
    page_size = k_cache.shape[1]
    sel = None
    if method == "topk":
        k, sink, local = decode_budget_pages(cfg, page_size)
        sel = select_pages(q, summaries, block_table, seq_lens, page_size, k, sink, local,
                           out=None if selected is None else selected[: q.shape[0]],
                           workspace=select_workspace)
    elif method != "dense":
        raise ValueError(f"unknown decode method {method!r}")
    sparse_decode(q, k_cache, v_cache, block_table, seq_lens, selected=sel, out=out, scale=scale,
                  workspace=workspace)
    return sel


def estimate_prefill_blocks(
    method: str,
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    scale: float,
) -> PrefillBlockLists:
    """Key-block lists for the prefill chunks described by ``meta`` with the given estimator."""
    hkv = k_cache.shape[2]
    if method == "dense":
        return all_causal_block_lists(meta, hkv)
    if method == "streaming":
        from sparse_kernels.estimate_streaming import estimate_streaming

        return estimate_streaming(meta, hkv, sink_tokens=cfg.sink_tokens,
                                  local_tokens=cfg.local_tokens)
    if method == "xattention":
        from sparse_kernels.estimate_xattention import estimate_xattention

        return estimate_xattention(q, k_cache, block_table, meta, threshold=cfg.xattn_threshold,
                                   stride=cfg.xattn_stride, scale=scale)
    if method == "vertical_slash":
        from sparse_kernels.estimate_vertical_slash import estimate_vertical_slash

        return estimate_vertical_slash(q, k_cache, block_table, meta, last_q=cfg.vs_last_q,
                                       n_vertical=cfg.vs_vertical, n_slash=cfg.vs_slash,
                                       scale=scale)
    if method == "flexprefill":
        from sparse_kernels.estimate_flexprefill import estimate_flexprefill

        return estimate_flexprefill(q, k_cache, block_table, meta, gamma=cfg.flex_gamma,
                                    tau=cfg.flex_tau, scale=scale)
    raise ValueError(f"unknown prefill method {method!r}")


def estimate_prefill_blocks_per_head(
    methods: dict[int | None, str],
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    scale: float,
) -> PrefillBlockLists:
    """Lists when KV heads use different estimators: ``methods`` maps a KV head (or ``None``,
    every other head) to its method, as :meth:`SparseConfig.methods_for` returns it. Each
    distinct method runs once over all heads; every head keeps the lists of its own method."""
    hkv = k_cache.shape[2]
    per_head = [methods.get(h, methods[None]) for h in range(hkv)]
    distinct = sorted(set(per_head))
    if len(distinct) == 1:
        return estimate_prefill_blocks(distinct[0], cfg, q, k_cache, block_table, meta, scale)
    merged_idx = merged_cnt = None
    for method in distinct:
        lists = estimate_prefill_blocks(method, cfg, q, k_cache, block_table, meta, scale)
        mask = torch.tensor([m == method for m in per_head], device=lists.block_count.device)
        if merged_idx is None:
            merged_idx, merged_cnt = lists.block_idx.clone(), lists.block_count.clone()
        merged_idx = torch.where(mask[None, :, None], lists.block_idx, merged_idx)
        merged_cnt = torch.where(mask[None, :], lists.block_count, merged_cnt)
    return PrefillBlockLists(merged_idx, merged_cnt, block_density(meta, merged_cnt))


def sparse_prefill_attention(
    method: str | dict[int | None, str],
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    out: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Estimate block lists, then block-sparse attention into ``out``; returns the density
    (computed blocks / causal blocks) as a device scalar. ``method`` is one estimator for all
    KV heads or a per-head map (see :func:`estimate_prefill_blocks_per_head`)."""
    if isinstance(method, dict):
        lists = estimate_prefill_blocks_per_head(method, cfg, q, k_cache, block_table, meta,
                                                 scale)
    else:
        lists = estimate_prefill_blocks(method, cfg, q, k_cache, block_table, meta, scale)
    block_sparse_prefill_attention(q, k_cache, v_cache, block_table, meta, lists.block_idx,
                                   lists.block_count, scale=scale, out=out)
    return lists.density


def warm_up_prefill(
    method: str | dict[int | None, str],
    cfg: SparseConfig,
    q_like: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> list[int]:
    """Compile the prefill path for every context-length bucket up to ``max_seq_len``.

    Some launch parameters follow the number of key blocks (next power of two), so the first
    request in each length bucket would otherwise JIT-compile kernels while serving. This runs
    one small chunk (one query block) at the end of a sequence of each bucket's length, reading
    page 0 of the cache for every page (reads only; the output goes to a scratch tensor).
    Returns the sequence lengths it ran.
    """
    from sparse_kernels.block_sparse_prefill import prefill_block_metadata

    dev = k_cache.device
    page = k_cache.shape[1]
    q_len = cfg.block_size
    lengths, n = [], 2 * cfg.block_size
    while True:
        lengths.append(min(n, max_seq_len))
        if n >= max_seq_len:
            break
        n *= 2
    q = torch.zeros((q_len,) + tuple(q_like.shape[1:]), dtype=q_like.dtype, device=dev)
    out = torch.empty_like(q)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device=dev)
    for seq_len in lengths:
        block_table = torch.zeros((1, -(-seq_len // page)), dtype=torch.int32, device=dev)
        seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=dev)
        meta = prefill_block_metadata(qsl, seq_lens, cfg.block_size, num_tokens=q_len,
                                      max_seq_len=seq_len)
        sparse_prefill_attention(method, cfg, q, k_cache, v_cache, block_table, meta, out, scale)
    return lengths

"""The sparse attention steps both engine adapters run, engine-agnostic.

* :func:`decode_attention` -- one query token per sequence: Quest page selection (or all pages)
  then split-KV paged decode. Static shapes, no host sync: safe inside CUDA graphs.
* :func:`sparse_prefill_attention` -- a ragged batch of prefill chunks: one estimator builds
  per-(query block, KV head) key-block lists, then block-sparse flash attention. Eager only.

Page summaries: the tokens of prefill chunks are summarized by the adapter right after the
engine writes K/V (:func:`sparse_kernels.page_summary.update_page_summaries`); a decode token's
page is re-summarized by the KV write itself where the adapter writes K/V with
:func:`sparse_kernels.kv_write.write_kv_and_summaries` (vLLM), or else inside the top-k scoring
launch (``decode_attention(fuse_summary=True)``), so a pure-decode step has no separate summary
launch.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from sparse_kernels.balanced_decode import balanced_decode, balanced_fits
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
from sparse_kernels.tooling_env import apply_tooling_env

# decode_overlap with the balanced dense-mode launch (large grids): launch the full rows'
# attention before the selection's branch (1) or after it (0). In a CUDA graph the branch
# launched first gets the SMs first. Measured on an H100 (session 17), us per layer: 4K x 16
# (all rows full) 104.3-104.7 with 1 against 106.1-106.7 with 0, but 32K / 128K x 16 (every row
# selects: the selection is the critical path and would start second) 281.0 / 431.7 against
# 271.8 / 419.5, and mixed batches (8 x 4K + 8 x 32K / 128K) 205.8 / 285.6 against 199.5 /
# 278.6; end to end (4K x 16, 128K engine) 0.997x and 0.951x of FLASH_ATTN on two machines.
# So 0: the long contexts the backend is for keep their order. Small grids (the split launch)
# ignore it.
FULL_ROWS_FIRST = 0


def decode_budget_pages(cfg: SparseConfig, page_size: int) -> tuple[int, int, int]:
    """(pages selected, sink pages, local pages) for a page size; cfg.check_model validated it."""
    return (cfg.token_budget // page_size, -(-cfg.sink_tokens // page_size),
            -(-cfg.local_tokens // page_size))


def decode_dense_pages(cfg: SparseConfig, page_size: int) -> int:
    """Top-k decode reads every page, unselected, of sequences of at most this many pages
    (``cfg.effective_decode_min_seq_len`` rounded down to whole pages); only sequences of
    more than the budget's pages are affected (see ``select_pages(dense_pages=...)``)."""
    return cfg.effective_decode_min_seq_len // page_size


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
    fuse_summary: bool = False,
    side_stream: torch.cuda.Stream | None = None,
    full_rows_attention: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None,
    full_rows_seq_lens: torch.Tensor | None = None,
    full_rows_disjoint: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Decode attention of ``q [B, Hq, D]`` into ``out``; returns the page selection (topk).

    ``method`` "topk": each (sequence, KV head) reads its top ``token_budget`` tokens' pages
    (sink and local pages always; sequences with fewer pages read all of them, and so do
    sequences of at most :func:`decode_dense_pages` pages, without scoring or top-k: their
    selection row is ``[DENSE_ROW, -1, ...]``). "dense": all pages. ``selected`` is an optional
    preallocated int32 ``[>=B, Hkv, k]`` buffer.

    ``cfg.decode_select`` picks the selection's launches (``"fused"``: one; a
    ``select_workspace`` for it needs its arrival counters, ``SelectWorkspace(counters=True)``).

    ``fuse_summary`` (topk): the summary of each sequence's last page, the page this step's
    token was written to, is recomputed inside the scoring launch from ``k_cache`` (instead of
    a separate ``update_page_summaries`` launch); every row, dense ones included. Needs one new
    token per sequence, already in the cache. Ignored by "dense", which reads no summaries.

    ``cfg.decode_overlap`` (topk): the rows that read every page (at most
    :func:`decode_full_pages` pages: shorter than the budget, or dense rows) are attended by a
    dense-mode launch that does not wait for the selection; the selection and the attention
    of the other rows run on ``side_stream`` beside it (joined before returning; a fork and
    a join of the current stream, which CUDA graphs capture as two branches). Without a
    side stream (CPU) the same launches run one after the other.

    ``full_rows_attention(seq_lens_full, out, max_seq_len_full)`` (with ``decode_overlap``): an
    engine's own dense paged decode for those rows instead of ours (vLLM: FlashAttention). It
    gets ``seq_lens`` with every other row set to 0 and an upper bound of the lengths left,
    and may write every row of ``out``: the other rows' attention is ordered after it, unless
    ``full_rows_disjoint``: it writes only the rows of at most :func:`decode_full_pages` pages,
    empty (padding) rows included, as our own dense-mode launch does; then it runs beside the
    selection and the other rows' attention.
    ``full_rows_seq_lens``: those lengths already built (:func:`full_row_seq_lens`, e.g. once
    per step by an adapter's metadata builder instead of once per layer here).
    With method "dense", ``full_rows_attention`` (if given) attends every row: give it only
    where every row is a full row (an engine whose longest sequence is at most
    :func:`decode_full_pages` pages, :func:`all_decode_rows_full`), with ``full_rows_seq_lens``
    (or ``seq_lens``) and an upper bound of the block table's tokens.

    ``keep`` (topk; selection reuse, :mod:`sparse_kernels.selection_reuse`): int32 flags per
    row; a flagged row skips scoring and top-k and is attended over its rows of ``selected``
    (required then) as an earlier step selected them. Flags come from
    :func:`~sparse_kernels.selection_reuse.update_reuse_rows`, once per engine step, and
    ``selected`` must be this layer's own buffer, kept between steps.
    """
    if method == "dense":
        if full_rows_attention is not None:  # every row read whole by the engine's kernel
            lens = seq_lens if full_rows_seq_lens is None else full_rows_seq_lens
            full_rows_attention(lens, out, block_table.shape[1] * k_cache.shape[1])
            return None
        if use_balanced_decode(cfg, q.shape[0], k_cache.shape[2], q.device):
            balanced_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, scale=scale,
                            workspace=workspace)
        else:
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, scale=scale,
                          workspace=workspace)
        return None
    if method != "topk":
        raise ValueError(f"unknown decode method {method!r}")
    if keep is not None and selected is None:
        raise ValueError("keep (selection reuse) needs the layer's selection buffer (selected)")

    def select() -> torch.Tensor:
        return decode_select_pages(cfg, q, k_cache, summaries, block_table, seq_lens,
                                   selected=selected, select_workspace=select_workspace,
                                   fuse_summary=fuse_summary, keep=keep)

    balanced = use_balanced_decode(cfg, q.shape[0], k_cache.shape[2], q.device)

    def attend(sel: torch.Tensor | None, row_filter: str, full_pages: int = 0) -> None:
        if sel is None and row_filter == "full" and balanced:
            balanced_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, scale=scale,
                            workspace=workspace, full_pages=full_pages)
            return
        sparse_decode(q, k_cache, v_cache, block_table, seq_lens, selected=sel, out=out,
                      scale=scale, workspace=workspace, row_filter=row_filter,
                      full_pages=full_pages)

    if not cfg.decode_overlap:
        sel = select()
        attend(sel, "all")
        return sel
    page_size = k_cache.shape[1]
    full_pages = decode_full_pages(cfg, page_size)
    side = side_stream if side_stream is not None and q.is_cuda else None
    main = torch.cuda.current_stream(q.device) if side is not None else None

    def on_side(fn):
        if side is None:
            return fn()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            return fn()

    if full_rows_attention is not None and full_rows_seq_lens is None:
        full_rows_seq_lens = full_row_seq_lens(cfg, seq_lens, page_size)
    if full_rows_attention is None or full_rows_disjoint:
        def select_and_attend() -> torch.Tensor:
            sel = select()
            attend(sel, "select", full_pages)
            return sel

        if FULL_ROWS_FIRST and balanced and full_rows_attention is None and side is not None:
            fork = main.record_event()  # the side branch must not wait for the launch below
            attend(None, "full", full_pages)
            side.wait_event(fork)
            with torch.cuda.stream(side):
                sel = select_and_attend()
        else:
            sel = on_side(select_and_attend)
            if full_rows_attention is None:
                attend(None, "full", full_pages)  # dense mode: reads no selection
            else:  # the engine's kernel, writing only the full rows
                full_rows_attention(full_rows_seq_lens, out, full_pages * page_size)
    else:
        sel = on_side(select)
        full_rows_attention(full_rows_seq_lens, out, full_pages * page_size)
        # the other rows' attention after the engine's launch, which writes every row
        on_side(lambda: attend(sel, "select", full_pages))
    if side is not None:
        main.wait_stream(side)
    return sel


def use_balanced_decode(cfg: SparseConfig, batch: int, num_kv_heads: int,
                        device: torch.device) -> bool:
    """Whether our dense-mode decode launch is
    :func:`~sparse_kernels.balanced_decode.balanced_decode` (``cfg.decode_dense_kernel``:
    "balanced", or "auto" on large grids) rather than ``sparse_decode``'s split launch."""
    kernel = cfg.decode_dense_kernel
    if kernel != "auto":
        return kernel == "balanced"
    return balanced_fits(batch, num_kv_heads, device)


def decode_full_pages(cfg: SparseConfig, page_size: int) -> int:
    """Top-k decode reads every page of sequences of at most this many pages: those within the
    budget (their selection lists every page) and the dense rows (:func:`decode_dense_pages`)."""
    return max(decode_budget_pages(cfg, page_size)[0], decode_dense_pages(cfg, page_size))


def full_row_seq_lens(cfg: SparseConfig, seq_lens: torch.Tensor, page_size: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``seq_lens`` with the rows that do not read every page (more than
    :func:`decode_full_pages` pages) set to 0: what ``full_rows_attention`` of
    :func:`decode_attention` attends; ``out``: a buffer to write it to."""
    max_full = decode_full_pages(cfg, page_size) * page_size
    if out is None:
        return torch.where(seq_lens <= max_full, seq_lens, 0)
    return torch.mul(seq_lens, seq_lens <= max_full, out=out)


def all_decode_rows_full(cfg: SparseConfig, page_size: int, max_seq_len: int | None) -> bool:
    """Whether every decode row of an engine whose sequences have at most ``max_seq_len``
    tokens reads every page (at most :func:`decode_full_pages` pages): top-k decode then
    never selects, and an adapter runs its decode layers dense (no page selection, no
    summaries to keep). ``None`` (unknown bound): False."""
    return bool(max_seq_len) and max_seq_len <= decode_full_pages(cfg, page_size) * page_size


def engine_dense_rows_enabled(cfg: SparseConfig, all_full: bool = False) -> bool:
    """Whether any decode batch may hand its full rows to an engine's dense decode
    (:func:`use_engine_dense_rows` says which batches do). ``all_full``: every decode row of
    the engine reads every page (:func:`all_decode_rows_full`). "engine": with
    ``decode_overlap`` (the rows beside the selection) or ``all_full``; "auto": ``all_full``
    only; "triton": never."""
    if cfg.decode_dense_rows == "triton":
        return False
    if cfg.decode_dense_rows == "auto":
        return all_full
    return cfg.decode_overlap or all_full


def use_engine_dense_rows(cfg: SparseConfig, batch: int, num_kv_heads: int,
                          device: torch.device, all_full: bool = False) -> bool:
    """Whether an adapter with its own dense decode passes it as ``full_rows_attention`` of
    :func:`decode_attention` (``cfg.decode_dense_rows``, see
    :func:`engine_dense_rows_enabled`; "auto": large grids only). Host ints only, so a CUDA
    graph captured for a batch size keeps its choice."""
    from sparse_kernels.sparse_decode import _small_grid

    if not engine_dense_rows_enabled(cfg, all_full):
        return False
    return cfg.decode_dense_rows == "engine" or not _small_grid(batch, num_kv_heads, device)


_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}
# Priority of the side stream (torch: lower is higher; 0 is every stream's default). A higher
# one lets the selection's programs start as soon as SMs free up beside a dense launch that
# fills the GPU, instead of after its last wave. CUDA graphs keep the priority of the stream
# each kernel was captured on (PyTorch instantiates them with UseNodePriority).
SIDE_STREAM_PRIORITY = 0
# Benchmarking only (see sparse_kernels.tooling_env), e.g. "FULL_ROWS_FIRST=1".
_TOOLING_ENV = "SPARSE_SERVE_PIPELINE"
_TUNABLE = ("FULL_ROWS_FIRST", "SIDE_STREAM_PRIORITY")
apply_tooling_env(globals(), _TOOLING_ENV, _TUNABLE, os.environ.get(_TOOLING_ENV))


def decode_side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream :func:`decode_attention` runs the selection on (one per device and
    :data:`SIDE_STREAM_PRIORITY`, clamped to the device's range; made once: call it before
    CUDA-graph capture); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    low, high = torch.cuda.Stream.priority_range()  # (lowest, highest): e.g. (0, -5)
    priority = max(high, min(low, SIDE_STREAM_PRIORITY))
    if (index, priority) not in _SIDE_STREAMS:
        _SIDE_STREAMS[index, priority] = torch.cuda.Stream(device=index, priority=priority)
    return _SIDE_STREAMS[index, priority]


def decode_select_pages(
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor | None = None,
    select_workspace: SelectWorkspace | None = None,
    fuse_summary: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The page selection of :func:`decode_attention` (method "topk"): the budget, sink, local
    window and dense rows of ``cfg``, launched as ``cfg.decode_select`` says; rows flagged in
    ``keep`` keep their rows of ``selected`` (selection reuse)."""
    page_size = k_cache.shape[1]
    k, sink, local = decode_budget_pages(cfg, page_size)
    fused = cfg.decode_select == "fused"
    return select_pages(q, summaries, block_table, seq_lens, page_size, k, sink, local,
                        out=None if selected is None else selected[: q.shape[0]],
                        method="fused" if fused else "triton",
                        topk_method="auto" if fused else cfg.decode_select,
                        workspace=select_workspace,
                        k_cache=k_cache if fuse_summary else None,
                        dense_pages=decode_dense_pages(cfg, page_size), keep=keep)


def estimate_prefill_blocks(
    method: str,
    cfg: SparseConfig,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    scale: float,
) -> PrefillBlockLists:
    """Key-block lists for the prefill chunks described by ``meta`` with the given estimator,
    then :func:`add_sink_blocks` (a sink of more than one block) and, with
    ``cfg.prefill_dense_last_blocks``, :func:`densify_last_blocks`."""
    lists = _estimate(method, cfg, q, k_cache, block_table, meta, scale)
    sink_blocks = -(-cfg.sink_tokens // meta.block_size)
    if method not in ("dense", "streaming") and sink_blocks > 1:  # block 0 is always kept
        lists = add_sink_blocks(lists, meta, sink_blocks)
    if cfg.prefill_dense_last_blocks and method != "dense":
        lists = densify_last_blocks(lists, meta, cfg.prefill_dense_last_blocks)
    return lists


def add_sink_blocks(lists: PrefillBlockLists, meta: PrefillBlockMeta,
                    num_blocks: int) -> PrefillBlockLists:
    """Add key blocks ``0 .. num_blocks - 1`` (the first ``sink_tokens``, within the causal
    range) to every row's list, keeping it ascending; what the estimator chose stays.

    A row's list is sorted, so its entries below ``n = min(num_blocks, i + 1)`` form a prefix
    of some length ``p``; the new row is ``0 .. n-1`` followed by the old entries from ``p``.
    Device ops only (no host sync)."""
    idx, cnt = lists.block_idx, lists.block_count
    nkb = idx.shape[2]
    pos = torch.arange(nkb, device=idx.device)
    n = torch.minimum(torch.full_like(meta.q_block_idx, num_blocks), meta.q_block_idx + 1)
    n = torch.where(meta.q_block_seq >= 0, n, 0).to(idx.dtype)[:, None, None]  # [nqb, 1, 1]
    listed = pos[None, None, :] < cnt[:, :, None]
    p = ((idx < n) & listed).sum(-1, keepdim=True).to(idx.dtype)  # [nqb, Hkv, 1]
    src = (pos[None, None, :] - n + p).clamp(0, nkb - 1).long()
    shifted = torch.gather(idx, 2, src)
    block_idx = torch.where(pos[None, None, :] < n, pos.to(idx.dtype)[None, None, :], shifted)
    block_count = (cnt - p[..., 0] + n[..., 0]).to(cnt.dtype)
    return PrefillBlockLists(block_idx, block_count, block_density(meta, block_count))


def densify_last_blocks(lists: PrefillBlockLists, meta: PrefillBlockMeta,
                        num_blocks: int) -> PrefillBlockLists:
    """The last ``num_blocks`` query blocks of each sequence in the chunk keep every causal key
    block (their rows of ``block_idx`` become ``0..i``); the other rows are unchanged.

    A chunk's last query blocks hold the newest tokens of the prompt so far; in the final chunk,
    the question whose hidden states start generation. Device ops only (no host sync)."""
    seq = meta.q_block_seq.long()
    valid = seq >= 0
    last = (meta.seq_lens.long()[seq.clamp(min=0)] - 1) // meta.block_size
    dense_row = valid & (meta.q_block_idx.long() > last - num_blocks)  # [num_q_blocks]
    full = all_causal_block_lists(meta, lists.block_idx.shape[1])
    block_idx = torch.where(dense_row[:, None, None], full.block_idx, lists.block_idx)
    block_count = torch.where(dense_row[:, None], full.block_count, lists.block_count)
    return PrefillBlockLists(block_idx, block_count, block_density(meta, block_count))


def _estimate(method, cfg, q, k_cache, block_table, meta, scale) -> PrefillBlockLists:
    hkv = k_cache.shape[2]
    if method == "dense":
        return all_causal_block_lists(meta, hkv)
    if method == "streaming":
        from sparse_kernels.estimate_streaming import estimate_streaming

        return estimate_streaming(meta, hkv, sink_tokens=cfg.sink_tokens,
                                  local_tokens=cfg.prefill_local_tokens)
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
    dense_fallback: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """Estimate block lists, then block-sparse attention into ``out``.

    ``method`` is one estimator for all KV heads or a per-head map (see
    :func:`estimate_prefill_blocks_per_head`). With ``dense_fallback`` (a function that writes
    dense causal attention of the same chunks into ``out``) and ``cfg.prefill_dense_above < 1``,
    a chunk whose estimated density exceeds ``prefill_dense_above`` runs ``dense_fallback``
    instead of the sparse kernel: the estimator found little to skip, and the engine's dense
    kernel is faster than ours at high density. That decision reads the density on the host
    (one synchronisation per call; prefill runs eagerly, never inside a CUDA graph).

    Returns ``(density, fell_back)``: density = computed blocks / causal blocks as estimated
    (a device scalar), and whether the dense fallback ran.
    """
    if isinstance(method, dict):
        lists = estimate_prefill_blocks_per_head(method, cfg, q, k_cache, block_table, meta,
                                                 scale)
    else:
        lists = estimate_prefill_blocks(method, cfg, q, k_cache, block_table, meta, scale)
    if (dense_fallback is not None and cfg.prefill_dense_above < 1.0
            and float(lists.density) > cfg.prefill_dense_above):
        dense_fallback()
        return lists.density, True
    block_sparse_prefill_attention(q, k_cache, v_cache, block_table, meta, lists.block_idx,
                                   lists.block_count, scale=scale, out=out)
    return lists.density, False


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

    Some launch parameters follow the number of key blocks (next power of two, and whether
    tensor strides derived from it are multiples of 16), so the first request of each kind
    would otherwise JIT-compile kernels while serving. This runs
    one small chunk (one query block) at the end of a sequence of each bucket's length, alone
    and beside a second sequence, reading page 0 of the cache for every page (reads only; the
    output goes to a scratch tensor).
    Returns the sequence lengths it ran.
    """
    from sparse_kernels.block_sparse_prefill import prefill_block_metadata

    dev = k_cache.device
    page = k_cache.shape[1]
    q_len = cfg.block_size
    # Per power-of-two bucket of key blocks, a length whose block count is a multiple of 16
    # and one whose count is not: Triton specializes integer arguments (strides of the
    # [.., num_key_blocks] tensors) on divisibility by 16, so both variants compile.
    lengths, n = [], 2 * cfg.block_size
    while True:
        top = min(n, max_seq_len)
        if top - cfg.block_size > n // 2:
            lengths.append(top - cfg.block_size)
        lengths.append(top)
        if n >= max_seq_len:
            break
        n *= 2
    # Each length once as a batch of one sequence and once as two: Triton also specializes
    # integer arguments equal to 1 (the batch size, strides of one-row tensors).
    q = torch.zeros((2 * q_len,) + tuple(q_like.shape[1:]), dtype=q_like.dtype, device=dev)
    out = torch.empty_like(q)
    for seq_len in lengths:
        for batch in (1, 2):
            lens = [seq_len] if batch == 1 else [seq_len, max(q_len, seq_len - cfg.block_size)]
            qsl = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=dev)
            block_table = torch.zeros((batch, -(-seq_len // page)), dtype=torch.int32,
                                      device=dev)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            meta = prefill_block_metadata(qsl, seq_lens, cfg.block_size,
                                          num_tokens=batch * q_len, max_seq_len=seq_len)
            sparse_prefill_attention(method, cfg, q[: batch * q_len], k_cache, v_cache,
                                     block_table, meta, out[: batch * q_len], scale)
    return lengths


def warm_up_summary_update(k_cache: torch.Tensor, summaries: torch.Tensor) -> None:
    """Compile :func:`update_page_summaries` for this cache layout (batches of one and of two
    sequences) without touching the engine's summaries: a one-page scratch buffer has the
    same strides as the real one, and only page 0 of the cache is read (through a one-page
    view of the cache, whose strides are the cache's own)."""
    from sparse_kernels.page_summary import update_page_summaries

    dev = k_cache.device
    scratch = torch.zeros((1,) + tuple(summaries.shape[1:]), dtype=summaries.dtype, device=dev)
    for batch in (1, 2):
        qsl = torch.arange(0, batch + 1, dtype=torch.int32, device=dev)
        update_page_summaries(k_cache[:1], scratch, torch.zeros((batch, 1), dtype=torch.int32,
                                                            device=dev),
                              qsl, torch.ones(batch, dtype=torch.int32, device=dev),
                              num_tokens=batch)


def warm_up_decode(method: str, cfg: SparseConfig, q_like: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> list[int]:
    """Compile :func:`sparse_decode` (and its split merge) for every split-count bucket, the
    balanced kernel, and the decode read counter's no-selection variant.

    The split count follows the batch size (:func:`~sparse_kernels.sparse_decode.default_num_splits`)
    and sets a compile-time constant (its next power of two), so a decode batch of a size no
    CUDA graph was captured for (a mixed batch runs eagerly) could otherwise compile while
    serving. One sequence of one page (page 0 of the cache, read only) per split count
    ``1, 2, 4, ..., MAX_SPLITS``, as a dense decode (``method`` "dense") or as a top-k
    selection row that reads every page (a selection buffer of the engine's width, whose
    size is an argument the kernel is specialized on) and, with ``cfg.decode_overlap``, also
    as a dense decode (the launch of the rows that read every page); the output goes to
    scratch. Returns the split counts.
    """
    from sparse_kernels.page_select import DENSE_ROW
    from sparse_kernels.sparse_decode import MAX_SPLITS, full_rows_num_stages

    dev = k_cache.device
    hq, d = q_like.shape[1:]
    q = torch.zeros((1, hq, d), dtype=q_like.dtype, device=dev)
    out = torch.empty_like(q)
    block_table = torch.zeros((1, 1), dtype=torch.int32, device=dev)
    seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
    selected = None
    if method == "topk":
        k, _, _ = decode_budget_pages(cfg, k_cache.shape[1])
        selected = torch.full((1, k_cache.shape[2], k), -1, dtype=torch.int32, device=dev)
        selected[:, :, 0] = DENSE_ROW
    workspace = DecodeWorkspace(1, hq, d, MAX_SPLITS, device=dev)
    # top-k with decode_overlap also runs its full rows in dense mode (another variant), with
    # their own pipeline depth at large grids (full_rows_num_stages), as dense decode does
    modes = [(selected, None)]
    if selected is not None and cfg.decode_overlap:
        modes.append((None, None))
        stages = full_rows_num_stages(k_cache)
        if stages is not None:
            modes.append((None, stages))
    splits, n = [], 1
    while n <= MAX_SPLITS:
        for sel, num_stages in modes:
            sparse_decode(q, k_cache, v_cache, block_table, seq_lens, selected=sel, out=out,
                          scale=scale, num_splits=n, workspace=workspace,
                          num_stages=num_stages)
        splits.append(n)
        n *= 2
    if cfg.decode_dense_kernel != "split" and (selected is None or cfg.decode_overlap):
        # one variant whatever the batch and lengths (its grid is (programs, KV heads))
        balanced_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, scale=scale,
                        full_pages=None if selected is None else 1)
    # The read counter's variant without a selection (decode rows an eager step folds into its
    # dense prefill launch): nothing else compiles it before serving. Its variant with a
    # selection is compiled by the engine's CUDA-graph capture, which runs decode steps first.
    # (An H100 log of a 4K batch in a 128K vLLM engine showed it compiling while serving.)
    from sparse_kernels.decode_stats import accumulate_decode_reads

    accumulate_decode_reads(None, seq_lens, k_cache.shape[1], k_cache.shape[2],
                            torch.zeros(2, dtype=torch.float64, device=dev))
    return splits

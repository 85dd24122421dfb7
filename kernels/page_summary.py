"""Quest page summaries: elementwise min / max of the keys of every KV page.

The summaries live in a side buffer beside the paged KV cache::

    summaries  [num_pages, 2, num_kv_heads, head_dim]   same dtype as k_cache
               summaries[p, 0] = min over the valid tokens of physical page p
               summaries[p, 1] = max over the valid tokens of physical page p

(min / max of bf16 / fp16 values is exact, so the buffer keeps the cache dtype.)

Two launchers:

* :func:`update_page_summaries` -- the decode/prefill step path. Runs right after the engine
  wrote this step's K/V into the cache. Incremental: only the pages that this step's tokens
  touched are recomputed, each from that page's valid tokens. CUDA-graph safe: the grid is
  ``(num_tokens, num_kv_heads)`` and depends on static shapes only; the program of a token
  works only if that token is the last one written into its page in this step.
* :func:`build_page_summaries` -- (re)computes every page of the given sequences, e.g. for
  pages that came from a prefix cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import next_power_of_2
from sparse_kernels.launch import fast_launch


@triton.jit
def _find_seq_idx(query_start_loc_ptr, token_idx, num_seqs):
    """Largest ``b`` with ``query_start_loc[b] <= token_idx`` (binary search)."""
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        val = tl.load(query_start_loc_ptr + mid)
        if val <= token_idx:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _summarize_page(
    k_cache_ptr,
    summ_ptr,
    phys_page,  # int64 scalar
    n_valid,  # tokens [0, n_valid) of the page are valid
    kv_head,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAGE_PAD: tl.constexpr,
):
    offs_t = tl.arange(0, PAGE_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    mask = (offs_t[:, None] < n_valid) & mask_d[None, :]
    k_ptrs = (
        k_cache_ptr
        + phys_page * stride_k_page
        + kv_head * stride_k_head
        + offs_t[:, None].to(tl.int64) * stride_k_tok
        + offs_d[None, :] * stride_k_dim
    )
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    k_min = tl.min(tl.where(mask, k, float("inf")), axis=0)
    k_max = tl.max(tl.where(mask, k, float("-inf")), axis=0)
    s_ptrs = summ_ptr + phys_page * stride_s_page + kv_head * stride_s_head + offs_d * stride_s_dim
    tl.store(s_ptrs, k_min.to(summ_ptr.dtype.element_ty), mask=mask_d)
    tl.store(s_ptrs + stride_s_kind, k_max.to(summ_ptr.dtype.element_ty), mask=mask_d)


@fast_launch
@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_seqs", "stride_bt",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "query_start_loc_ptr", "seq_lens_ptr",
    ],
)
def _update_summaries_kernel(
    k_cache_ptr,
    summ_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    num_seqs,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    stride_bt,
    PAGE_SIZE: tl.constexpr,
    PAGE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token_idx = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Padding tokens (CUDA-graph batches) lie beyond query_start_loc[num_seqs].
    if token_idx >= tl.load(query_start_loc_ptr + num_seqs):
        return
    seq_idx = _find_seq_idx(query_start_loc_ptr, token_idx, num_seqs)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    pos = seq_len - q_len + (token_idx - q_start)
    if pos < 0:
        return
    in_page = pos % PAGE_SIZE
    # Only the last token of this step that lands in a page summarizes that page.
    if (in_page != PAGE_SIZE - 1) & (pos != seq_len - 1):
        return
    logical_page = pos // PAGE_SIZE
    phys_page = tl.load(block_table_ptr + seq_idx.to(tl.int64) * stride_bt + logical_page)
    _summarize_page(
        k_cache_ptr, summ_ptr, phys_page.to(tl.int64), in_page + 1, kv_head,
        stride_k_page, stride_k_tok, stride_k_head, stride_k_dim,
        stride_s_page, stride_s_kind, stride_s_head, stride_s_dim,
        HEAD_DIM, HEAD_DIM_PAD, PAGE_PAD,
    )


@fast_launch
@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_bt",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr",
    ],
)
def _build_summaries_kernel(
    k_cache_ptr,
    summ_ptr,
    block_table_ptr,
    seq_lens_ptr,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    stride_bt,
    PAGE_SIZE: tl.constexpr,
    PAGE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    logical_page = tl.program_id(0)  # axis 0: the only one allowed > 65535 programs
    seq_idx = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    page_start = logical_page * PAGE_SIZE
    if page_start >= seq_len:
        return
    n_valid = tl.minimum(seq_len - page_start, PAGE_SIZE)
    phys_page = tl.load(block_table_ptr + seq_idx.to(tl.int64) * stride_bt + logical_page)
    _summarize_page(
        k_cache_ptr, summ_ptr, phys_page.to(tl.int64), n_valid, kv_head,
        stride_k_page, stride_k_tok, stride_k_head, stride_k_dim,
        stride_s_page, stride_s_kind, stride_s_head, stride_s_dim,
        HEAD_DIM, HEAD_DIM_PAD, PAGE_PAD,
    )


def _check(k_cache: torch.Tensor, summaries: torch.Tensor) -> None:
    num_pages, _, num_kv_heads, head_dim = k_cache.shape
    assert summaries.dim() == 4 and summaries.shape[1] == 2, summaries.shape
    assert summaries.shape[2:] == (num_kv_heads, head_dim), (summaries.shape, k_cache.shape)
    assert summaries.shape[0] >= num_pages, (summaries.shape, k_cache.shape)


def page_summaries_shape(k_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """``(num_pages, 2, num_kv_heads, head_dim)``: the summaries of ``k_cache``'s pages (its
    dtype: one key-sized row each for the min and the max)."""
    num_pages, _, num_kv_heads, head_dim = k_cache.shape
    return (num_pages, 2, num_kv_heads, head_dim)


def allocate_page_summaries(k_cache: torch.Tensor) -> torch.Tensor:
    """Empty :func:`page_summaries_shape` buffer matching ``k_cache``."""
    return torch.empty(page_summaries_shape(k_cache), dtype=k_cache.dtype,
                       device=k_cache.device)


def update_page_summaries(
    k_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_tokens: int | None = None,
) -> None:
    """Refresh the summaries of the pages written by this step's tokens (in place).

    Args:
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (any strides), with this
            step's keys already written.
        summaries: ``[num_pages, 2, num_kv_heads, head_dim]``, same dtype as ``k_cache``.
        block_table: int32 ``[batch, max_pages_per_seq]``.
        query_start_loc: int32 ``[batch + 1]``: this step's tokens of sequence ``b`` are
            ``query_start_loc[b]:query_start_loc[b+1]``, the last positions of the sequence.
        seq_lens: int32 ``[batch]``, including this step's tokens.
        num_tokens: static grid size (>= ``query_start_loc[-1]``; padding tokens are skipped).
            Defaults to ``block_table.shape[0]`` (one token per sequence: pure decode).

    A token at position ``p`` of a sequence of length ``s`` summarizes its page when
    ``p % page_size == page_size - 1`` or ``p == s - 1``, over the page's tokens
    ``[page_start, p]``. Pages no token of this step touched are left as they were.
    """
    _check(k_cache, summaries)
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    batch = block_table.shape[0]
    if num_tokens is None:
        num_tokens = batch
    if num_tokens == 0 or batch == 0:
        return
    grid = (num_tokens, num_kv_heads)
    _update_summaries_kernel[grid](
        k_cache, summaries, block_table, query_start_loc, seq_lens, batch,
        *k_cache.stride(), *summaries.stride(), block_table.stride(0),
        PAGE_SIZE=page_size,
        PAGE_PAD=next_power_of_2(page_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        num_warps=4 if page_size * head_dim >= 4096 else 1,
    )


def build_page_summaries(
    k_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_pages: int | None = None,
) -> None:
    """(Re)compute the summaries of every page of the given sequences (in place).

    Args:
        k_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (any strides).
        summaries: ``[num_pages, 2, num_kv_heads, head_dim]``.
        block_table: int32 ``[batch, max_pages_per_seq]`` (rows of the sequences to build).
        seq_lens: int32 ``[batch]``.
        max_pages: host int bounding the pages per sequence (grid size); defaults to
            ``block_table.shape[1]`` (no host sync either way).
    """
    _check(k_cache, summaries)
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    batch = block_table.shape[0]
    max_pages = block_table.shape[1] if max_pages is None else min(max_pages, block_table.shape[1])
    if batch == 0 or max_pages == 0:
        return
    grid = (max_pages, batch, num_kv_heads)
    _build_summaries_kernel[grid](
        k_cache, summaries, block_table, seq_lens,
        *k_cache.stride(), *summaries.stride(), block_table.stride(0),
        PAGE_SIZE=page_size,
        PAGE_PAD=next_power_of_2(page_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        num_warps=4 if page_size * head_dim >= 4096 else 1,
    )

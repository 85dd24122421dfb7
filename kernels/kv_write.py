"""The KV write of a step, with the page summaries of decode tokens kept in the same launch.

An engine writes each new token's K and V into its paged cache at ``slot_mapping[t]``
(``page = slot // page_size``, ``offset = slot % page_size``; ``-1``: a padding token, not
written). :func:`write_kv_and_summaries` does that write and, for every token that is the only
one of this step in its page (a decode token; also a prefill token that begins or ends a page
on its own), recomputes that page's Quest summary (:mod:`sparse_kernels.page_summary`) from the
page's earlier tokens and the new key. The earlier tokens were written by earlier steps, so the
summary is exact, and no other program of the launch touches that page: no races.

Pages that several of this step's tokens write (prefill chunks) are left as they were: the
adapter recomputes them after the write (:func:`~sparse_kernels.page_summary.update_page_summaries`,
which also covers the pages above). So a pure-decode step keeps every summary exact without a
launch of its own, and without refreshing the last page inside the scoring launch
(``decode_attention(fuse_summary=True)``, still there for callers whose KV write is not this one).

Grid ``(num_slots, num_kv_heads)``: static shapes, no host sync, safe inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import next_power_of_2
from sparse_kernels.launch import fast_launch


@fast_launch
@triton.jit(
    # not specialized on values that change with the batch: no compile while serving
    do_not_specialize=["num_slots"],
    do_not_specialize_on_alignment=["key_ptr", "value_ptr", "slot_ptr"],
)
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    summ_ptr,
    num_slots,
    stride_key_t,
    stride_key_h,
    stride_key_d,
    stride_val_t,
    stride_val_h,
    stride_val_d,
    stride_k_page,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_tok,
    stride_v_head,
    stride_v_dim,
    stride_s_page,
    stride_s_kind,
    stride_s_head,
    stride_s_dim,
    PAGE_SIZE: tl.constexpr,
    PAGE_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SUMMARIZE: tl.constexpr,
):
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return  # padding token
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_key_t + kv_head * stride_key_h + offs_d * stride_key_d,
                mask=mask_d, other=0.0).to(k_cache_ptr.dtype.element_ty)
    v = tl.load(value_ptr + t64 * stride_val_t + kv_head * stride_val_h + offs_d * stride_val_d,
                mask=mask_d, other=0.0).to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + page * stride_k_page + offset * stride_k_tok
             + kv_head * stride_k_head + offs_d * stride_k_dim, k, mask=mask_d)
    tl.store(v_cache_ptr + page * stride_v_page + offset * stride_v_tok
             + kv_head * stride_v_head + offs_d * stride_v_dim, v, mask=mask_d)
    if SUMMARIZE:
        # A request's tokens of one page are adjacent in the step, and two requests never
        # write one page in a step: a token whose neighbours are on other pages is alone.
        prev = tl.load(slot_ptr + t - 1, mask=t > 0, other=-1).to(tl.int64)
        nxt = tl.load(slot_ptr + t + 1, mask=t + 1 < num_slots, other=-1).to(tl.int64)
        alone = ((prev < 0) | (prev // PAGE_SIZE != page)) & (
            (nxt < 0) | (nxt // PAGE_SIZE != page))
        if alone:
            offs_t = tl.arange(0, PAGE_PAD)
            mask = (offs_t[:, None] < offset) & mask_d[None, :]
            old = tl.load(k_cache_ptr + page * stride_k_page
                          + offs_t[:, None].to(tl.int64) * stride_k_tok
                          + kv_head * stride_k_head + offs_d[None, :] * stride_k_dim,
                          mask=mask, other=0.0).to(tl.float32)
            kf = k.to(tl.float32)
            k_min = tl.minimum(tl.min(tl.where(mask, old, float("inf")), axis=0), kf)
            k_max = tl.maximum(tl.max(tl.where(mask, old, float("-inf")), axis=0), kf)
            s_ptrs = (summ_ptr + page * stride_s_page + kv_head * stride_s_head
                      + offs_d * stride_s_dim)
            tl.store(s_ptrs, k_min.to(summ_ptr.dtype.element_ty), mask=mask_d)
            tl.store(s_ptrs + stride_s_kind, k_max.to(summ_ptr.dtype.element_ty), mask=mask_d)


def write_kv_and_summaries(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    summaries: torch.Tensor | None = None,
) -> None:
    """Write this step's K/V into the paged cache; refresh the summaries of pages written by
    one token of the step (see the module docstring).

    Args:
        key, value: ``[>= num_slots, num_kv_heads, head_dim]`` (any strides; rows past
            ``slot_mapping``'s length are ignored, as engines pad them).
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (any strides:
            NHD, HND, vLLM's interleaved K/V views).
        slot_mapping: integer ``[num_slots]``, ``page * page_size + offset`` per token, ``-1``
            for a token not to write. Its length is the grid (static under CUDA graphs).
        summaries: ``[num_pages, 2, num_kv_heads, head_dim]`` (min, max), or ``None``: only
            the write.
    """
    num_slots = slot_mapping.shape[0]
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert key.shape[0] >= num_slots and key.shape[1:] == (num_kv_heads, head_dim), key.shape
    assert value.shape[0] >= num_slots and value.shape[1:] == key.shape[1:], value.shape
    if summaries is not None:
        assert summaries.shape[1:] == (2, num_kv_heads, head_dim), summaries.shape
        assert summaries.shape[0] >= k_cache.shape[0], (summaries.shape, k_cache.shape)
    if num_slots == 0:
        return
    summ, s_strides = (summaries, summaries.stride()) if summaries is not None else (
        k_cache, (0, 0, 0, 0))
    _write_kv_kernel[(num_slots, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping, summ, num_slots,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), *s_strides,
        PAGE_SIZE=page_size,
        PAGE_PAD=next_power_of_2(page_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        SUMMARIZE=summaries is not None,
        num_warps=1 if page_size * head_dim < 4096 else 4,
    )


__all__ = ["write_kv_and_summaries"]

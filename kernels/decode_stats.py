"""Decode read counters in one launch: KV tokens attended and held by a decode step.

An adapter's metrics (the fraction of the held KV a decode step reads) need, once per step,
the tokens each (sequence, KV head) row attended: the pages of its selection, the last one
counted partially, or the whole sequence for rows that read every page. Built from tensor ops
(:func:`sparse_kernels.page_select.tokens_read`, the reference) that is a dozen small launches
per step inside a decode CUDA graph (~28 us per step on an H100); :func:`accumulate_decode_reads`
is one launch, grid ``(batch, num_kv_heads)``, adding ``(read, held)`` into two fp64 device
counters with atomics (integer counts: exact in fp64 whatever the order). Static shapes, no
host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import next_power_of_2
from sparse_kernels.launch import fast_launch
from sparse_kernels.page_select import DENSE_ROW


@fast_launch
@triton.jit(
    # not specialized on values that change with the batch or engine: compiled once
    do_not_specialize=["num_select", "stride_sel_b", "stride_sel_h", "stride_sel_k"],
    do_not_specialize_on_alignment=["sel_ptr", "seq_lens_ptr"],
)
def _decode_reads_kernel(
    sel_ptr, seq_lens_ptr, sums_ptr,
    num_select,
    stride_sel_b, stride_sel_h, stride_sel_k,
    PAGE_SIZE: tl.constexpr, HAS_SEL: tl.constexpr, BLOCK: tl.constexpr,
    DENSE: tl.constexpr,
):
    """Program ``(b, h)``: tokens read by row ``(b, h)`` into ``sums[0]``, its held tokens
    (``seq_len``) into ``sums[1]``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    read = seq_len
    if HAS_SEL:
        row = sel_ptr + b.to(tl.int64) * stride_sel_b + h * stride_sel_h
        first = tl.load(row)
        offs = tl.arange(0, BLOCK)
        n = tl.zeros([], dtype=tl.int64)
        for k0 in range(0, num_select, BLOCK):
            k = k0 + offs
            page = tl.load(row + k * stride_sel_k, mask=k < num_select, other=-1)
            tok = tl.minimum(tl.maximum(seq_len - page.to(tl.int64) * PAGE_SIZE, 0), PAGE_SIZE)
            n += tl.sum(tl.where(page >= 0, tok, 0), 0)
        read = tl.where(first == DENSE, seq_len, n)
    tl.atomic_add(sums_ptr, read.to(tl.float64))
    tl.atomic_add(sums_ptr + 1, seq_len.to(tl.float64))


def accumulate_decode_reads(selected: torch.Tensor | None, seq_lens: torch.Tensor,
                            page_size: int, num_kv_heads: int, sums: torch.Tensor) -> None:
    """``sums[0] += tokens read``, ``sums[1] += tokens held`` by a decode step's rows.

    Args:
        selected: int32 ``[>=batch, num_kv_heads, k]`` page selection (``-1`` padding, a
            :data:`~sparse_kernels.page_select.DENSE_ROW` row reads every page), or ``None``:
            every row read whole (dense decode).
        seq_lens: int32 ``[batch]``.
        sums: fp64 device tensor of at least two elements.
    """
    batch = seq_lens.shape[0]
    if batch == 0:
        return
    assert sums.dtype == torch.float64 and sums.is_contiguous()
    if selected is None:
        sel, strides, k, has_sel = seq_lens, (0, 0, 0), 1, False
    else:
        assert selected.shape[0] >= batch and selected.shape[1] == num_kv_heads
        sel, strides, k, has_sel = selected, selected.stride(), selected.shape[2], True
    _decode_reads_kernel[(batch, num_kv_heads)](
        sel, seq_lens, sums, k, *strides,
        PAGE_SIZE=page_size, HAS_SEL=has_sel,
        BLOCK=min(1024, next_power_of_2(max(k, 16))), DENSE=DENSE_ROW, num_warps=4)


__all__ = ["accumulate_decode_reads"]

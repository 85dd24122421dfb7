"""What block-sparse prefill skips, summarized: per-block mean keys and values.

A block-sparse row computes exact attention over its listed key blocks and, by default, drops
the rest: the softmax renormalizes over what was kept, so every kept key gains the weight the
skipped ones had. On a long prompt the estimator skips the low-scoring tail of many blocks,
and that tail's mass goes to the kept blocks, in every layer (``prefill_skipped_blocks="drop"``).

``prefill_skipped_blocks="mean"`` keeps the tail in a cheap form: every causal key block that
lies wholly before the query block and is not listed enters the softmax as ONE pseudo-key, the
block's mean key, with the block's mean value and a logit bias of ``log(block_size)``:

    sum_{t in block} exp(q.k_t) v_t  ~=  block_size * exp(q.mean(k)) * mean(v)

(first order in the spread of q.k_t within the block; by Jensen it underestimates the block's
mass, never overestimates it). The kernel folds these pseudo-keys into the same online softmax
after the listed blocks (``block_sparse_prefill._block_sparse_prefill_kernel``, ``SKIPPED_MEAN``).
Cost per query row: one pseudo-key per earlier block (1/block_size of a dense row's keys), and
one pass over the prefix's K and V per chunk and layer for the means (:func:`block_means`).

Diagonal and later blocks, and blocks the estimator listed, get no pseudo-key; a row whose
lists cover every causal block is unchanged (full density stays exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta

__all__ = ["SkippedBlockMeans", "block_means", "listed_block_mask", "skipped_block_means"]


class SkippedBlockMeans:
    """Inputs of the kernel's pseudo-key pass (all on device).

    ``k_mean`` / ``v_mean`` ``[batch, max_kv_blocks, Hkv, D]`` (the cache dtype; rows of blocks
    that are not full are zero and never read), ``listed`` uint8
    ``[num_q_blocks, Hkv, max_kv_blocks]`` (any strides): 1 where the slot's list names the block.
    """

    def __init__(self, k_mean: torch.Tensor, v_mean: torch.Tensor, listed: torch.Tensor):
        self.k_mean, self.v_mean, self.listed = k_mean, v_mean, listed


@triton.jit(do_not_specialize=["max_kv_blocks", "stride_bt"],
            do_not_specialize_on_alignment=["block_table_ptr", "seq_lens_ptr"])
def _block_means_kernel(
    k_ptr, v_ptr, km_ptr, vm_ptr,
    block_table_ptr, seq_lens_ptr,
    max_kv_blocks,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_mb, stride_mj, stride_mh, stride_md,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    b = pid // max_kv_blocks
    j = pid % max_kv_blocks
    seq_len = tl.load(seq_lens_ptr + b)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    kpos = j * BLOCK_SIZE + offs_t
    full = (j + 1) * BLOCK_SIZE <= seq_len
    page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + kpos // PAGE_SIZE,
                   mask=full & (kpos < seq_len), other=0).to(tl.int64)
    in_page = (kpos % PAGE_SIZE).to(tl.int64)
    ld = full & (kpos < seq_len)
    k = tl.load(k_ptr + page[:, None] * stride_kp + in_page[:, None] * stride_ks
                + kvh * stride_kh + offs_d[None, :] * stride_kd, mask=ld[:, None], other=0.0)
    v = tl.load(v_ptr + page[:, None] * stride_vp + in_page[:, None] * stride_vs
                + kvh * stride_vh + offs_d[None, :] * stride_vd, mask=ld[:, None], other=0.0)
    inv = 1.0 / BLOCK_SIZE
    km = tl.sum(k.to(tl.float32), 0) * inv
    vm = tl.sum(v.to(tl.float32), 0) * inv
    o = b.to(tl.int64) * stride_mb + j.to(tl.int64) * stride_mj + kvh * stride_mh + offs_d * stride_md
    tl.store(km_ptr + o, km.to(km_ptr.dtype.element_ty))
    tl.store(vm_ptr + o, vm.to(vm_ptr.dtype.element_ty))


def block_means(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                meta: PrefillBlockMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key and value of every full ``meta.block_size``-token block of every sequence:
    ``[batch, max_kv_blocks, Hkv, D]`` each, in the cache dtype (fp32 accumulation); blocks
    that are not full get zeros. Reads the caches through the page table (any strides)."""
    _, page_size, hkv, d = k_cache.shape
    shape = (meta.batch_size, meta.max_kv_blocks, hkv, d)
    k_mean = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
    v_mean = torch.empty(shape, dtype=v_cache.dtype, device=v_cache.device)
    if meta.batch_size == 0:
        return k_mean, v_mean
    _block_means_kernel[(meta.batch_size * meta.max_kv_blocks, hkv)](
        k_cache, v_cache, k_mean, v_mean,
        block_table, meta.seq_lens,
        meta.max_kv_blocks,
        *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0),
        *k_mean.stride(),
        BLOCK_SIZE=meta.block_size,
        HEAD_DIM=d,
        PAGE_SIZE=page_size,
        num_warps=4,
    )
    return k_mean, v_mean


def listed_block_mask(lists: PrefillBlockLists, meta: PrefillBlockMeta) -> torch.Tensor:
    """uint8 ``[num_q_blocks, Hkv, max_kv_blocks]``: 1 where a slot's list names the key block
    (entries past ``block_count`` are ignored). Device ops only."""
    nqb, hkv, width = lists.block_idx.shape
    nkb = meta.max_kv_blocks
    dev = lists.block_idx.device
    valid = torch.arange(width, device=dev) < lists.block_count[..., None]
    idx = torch.where(valid, lists.block_idx.long(), nkb).clamp_(0, nkb)
    mask = torch.zeros(nqb, hkv, nkb + 1, dtype=torch.uint8, device=dev)
    mask.scatter_(2, idx, 1)
    return mask[..., :nkb]


def skipped_block_means(k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, meta: PrefillBlockMeta,
                        lists: PrefillBlockLists) -> SkippedBlockMeans:
    """Everything the kernel's pseudo-key pass needs for these lists."""
    k_mean, v_mean = block_means(k_cache, v_cache, block_table, meta)
    return SkippedBlockMeans(k_mean, v_mean, listed_block_mask(lists, meta))

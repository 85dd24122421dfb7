"""Block-sparse flash attention for a ragged batch of prefill chunks over the paged KV cache.

Blocks
------
Query blocks and key blocks are both ``block_size`` tokens wide and both aligned to ABSOLUTE
positions: key block ``j`` of a sequence is positions ``[j*B, (j+1)*B)``, and query block ``i``
is the queries of this step whose positions fall in ``[i*B, (i+1)*B)``. A sequence's chunk starts
at ``seq_len - q_len``, which is generally not a multiple of ``B``, so its first (and last) query
block may hold fewer than ``B`` queries. With this alignment key block ``i`` is always the
diagonal block of query block ``i``, and query block ``i`` has exactly ``i + 1`` causal key
blocks ``0..i`` (prefix pages included: chunked prefill).

The query blocks of the whole batch are numbered sequence by sequence (slots); see
:func:`prefill_block_metadata`. The number of slots is a host-side upper bound
(``num_tokens // B + 2 * batch``), so building the metadata never synchronises; padding slots
have ``q_block_seq == -1`` and their programs exit at once.

Block lists
-----------
``block_idx`` int32 ``[num_q_blocks, num_kv_heads, max_kv_blocks]`` and ``block_count`` int32
``[num_q_blocks, num_kv_heads]``: for query-block slot ``s`` and KV head ``h`` the kernel attends to
key blocks ``block_idx[s, h, :block_count[s, h]]`` (any order, no duplicates), with the causal
mask applied inside every tile. Lists are per KV head: all query heads of a GQA group share them,
so one program loads each K/V tile once for the whole group.

Kernel
------
One program = one sub-block of ``BLOCK_Q`` queries of one query block, for ALL ``G`` query heads
of one KV head: its tile has ``BLOCK_Q * G_PAD`` rows (token-major, head-minor, as in vLLM's
``triton_unified_attention``), so ``tl.dot`` sees up to 256 rows whatever the group size and each
K/V tile is loaded once for the whole group. Keys are
read through the page table one row (token) at a time, so any page size works (1, 16, 64, ...);
when the page size is a multiple of the key tile, one page index per tile is loaded instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv, next_power_of_2

__all__ = [
    "PrefillBlockMeta",
    "PrefillBlockLists",
    "chunk_tiles",
    "max_tiles",
    "interpret_upcast",
    "prefill_block_metadata",
    "all_causal_block_lists",
    "block_density",
    "block_sparse_prefill_attention",
    "chunk_of_sequence",
]


# ----------------------------------------------------------------------------- metadata


@dataclass
class PrefillBlockMeta:
    """Query-block map of a ragged prefill batch (all tensors on the batch's device).

    ``num_q_blocks`` slots; slot ``s`` is query block ``q_block_idx[s]`` (absolute block index,
    i.e. the index of its diagonal key block) of sequence ``q_block_seq[s]`` (``-1``: padding).
    Its queries are rows ``q_block_tok_start[s] : + q_block_tok_len[s]`` of ``q``.
    """

    block_size: int
    num_q_blocks: int  # slots (host int, upper bound)
    max_kv_blocks: int  # cdiv(max_seq_len, block_size): width of a full block list
    max_seq_len: int
    num_tokens: int
    batch_size: int
    query_start_loc: torch.Tensor  # int32 [batch + 1]
    seq_lens: torch.Tensor  # int32 [batch]
    q_block_seq: torch.Tensor  # int32 [num_q_blocks]
    q_block_idx: torch.Tensor  # int32 [num_q_blocks]
    q_block_tok_start: torch.Tensor  # int32 [num_q_blocks]
    q_block_tok_len: torch.Tensor  # int32 [num_q_blocks]


@dataclass
class PrefillBlockLists:
    """What every prefill estimator returns (all on device, no host sync).

    ``block_idx`` int32 ``[num_q_blocks, num_kv_heads, max_kv_blocks]`` (ascending key-block
    indices, entries past the count are unspecified), ``block_count`` int32
    ``[num_q_blocks, num_kv_heads]``, ``density`` fp32 scalar = computed blocks / causal blocks.
    """

    block_idx: torch.Tensor
    block_count: torch.Tensor
    density: torch.Tensor


def chunk_tiles(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tile: int,
    num_tiles: int,
) -> dict[str, torch.Tensor]:
    """Cut every sequence's chunk into position-aligned tiles of ``tile`` tokens, on device.

    Tile ``t`` of sequence ``b`` covers positions ``[t*tile, (t+1)*tile) ∩ [seq_len - q_len,
    seq_len)``. Returns int32 tensors of ``num_tiles`` slots (tiles numbered sequence by
    sequence; unused slots have ``seq == -1`` and ``tok_len == 0``): ``seq``, ``idx`` (absolute tile
    index), ``tok_start``, ``tok_len``; and per sequence ``seq_first`` (absolute index of its first
    tile) and ``seq_slot0`` (slot of its first tile). ``num_tiles`` must be at least
    ``num_tokens // tile + 2 * batch`` (the bound :func:`prefill_block_metadata` uses).
    """
    dev = seq_lens.device
    qsl = query_start_loc.to(device=dev, dtype=torch.int64)
    seq_len = seq_lens.to(torch.int64)
    q_len = qsl[1:] - qsl[:-1]
    start = seq_len - q_len
    first = torch.div(start, tile, rounding_mode="floor")
    end = torch.where(q_len > 0, torch.div(seq_len + tile - 1, tile, rounding_mode="floor"), first)
    n = end - first
    cum = torch.cumsum(n, 0)
    slot0 = cum - n
    j = torch.arange(num_tiles, device=dev, dtype=torch.int64)
    b = torch.searchsorted(cum, j, right=True)
    valid = b < seq_len.numel()
    bc = b.clamp(max=seq_len.numel() - 1)
    idx = first[bc] + (j - slot0[bc])
    pos0 = torch.maximum(idx * tile, start[bc])
    pos1 = torch.minimum((idx + 1) * tile, seq_len[bc])
    tok_start = qsl[bc] + pos0 - start[bc]
    tok_len = torch.where(valid, pos1 - pos0, 0)
    i32 = torch.int32
    return {
        "seq": torch.where(valid, bc, -1).to(i32),
        "idx": torch.where(valid, idx, 0).to(i32),
        "tok_start": torch.where(valid, tok_start, 0).to(i32),
        "tok_len": tok_len.to(i32),
        "seq_first": first.to(i32),
        "seq_slot0": slot0.to(i32),
    }


def max_tiles(num_tokens: int, batch_size: int, tile: int) -> int:
    """Host-side upper bound on the tiles of :func:`chunk_tiles`."""
    return num_tokens // tile + 2 * batch_size


def prefill_block_metadata(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    *,
    num_tokens: int | None = None,
    max_seq_len: int | None = None,
) -> PrefillBlockMeta:
    """Query-block map of a ragged prefill batch (see module docstring).

    ``query_start_loc`` int32 ``[batch + 1]``, ``seq_lens`` int32 ``[batch]`` (device tensors).
    ``num_tokens`` (= ``q.shape[0]``) and ``max_seq_len`` are host ints the engine already has;
    when omitted they are read from the tensors (a host sync; fine in tests).
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if num_tokens is None:
        num_tokens = int(query_start_loc[-1].item())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item()) if seq_lens.numel() else 0
    batch = seq_lens.numel()
    nqb = max(max_tiles(num_tokens, batch, block_size), 1)
    t = chunk_tiles(query_start_loc, seq_lens, block_size, nqb)
    return PrefillBlockMeta(
        block_size=block_size,
        num_q_blocks=nqb,
        max_kv_blocks=max(cdiv(max_seq_len, block_size), 1),
        max_seq_len=max_seq_len,
        num_tokens=num_tokens,
        batch_size=batch,
        query_start_loc=query_start_loc.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        q_block_seq=t["seq"],
        q_block_idx=t["idx"],
        q_block_tok_start=t["tok_start"],
        q_block_tok_len=t["tok_len"],
    )


def block_density(meta: PrefillBlockMeta, block_count: torch.Tensor) -> torch.Tensor:
    """fp32 device scalar: listed blocks / causal blocks, over valid query blocks and KV heads."""
    valid = meta.q_block_seq >= 0
    causal = torch.where(valid, meta.q_block_idx.to(torch.float32) + 1.0, 0.0)
    total = causal.sum() * block_count.shape[1]
    listed = (block_count.to(torch.float32) * valid[:, None]).sum()
    return listed / total.clamp(min=1.0)


def all_causal_block_lists(meta: PrefillBlockMeta, num_kv_heads: int) -> PrefillBlockLists:
    """Dense-equivalent lists: query block ``i`` gets key blocks ``0..i`` for every KV head."""
    dev = meta.q_block_idx.device
    nkb = meta.max_kv_blocks
    idx = torch.arange(nkb, device=dev, dtype=torch.int32)
    block_idx = idx.view(1, 1, nkb).expand(meta.num_q_blocks, num_kv_heads, nkb).contiguous()
    cnt = torch.where(meta.q_block_seq >= 0, meta.q_block_idx + 1, 0).to(torch.int32)
    block_count = cnt[:, None].expand(meta.num_q_blocks, num_kv_heads).contiguous()
    return PrefillBlockLists(block_idx, block_count, block_density(meta, block_count))


# ----------------------------------------------------------------------------- kernel


def interpret_upcast(dtype: torch.dtype) -> bool:
    """Triton 3.6's CPU interpreter multiplies bf16/fp16 ``tl.dot`` operands as raw integers;
    under TRITON_INTERPRET the kernels upcast them to fp32 first (same values, fp32 math)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and dtype in (
        torch.bfloat16, torch.float16)



@triton.jit
def chunk_of_sequence(b, seq_lens_ptr, qsl_ptr):
    """(length, first query token, first position of this step's chunk) of sequence ``b``
    of a ragged prefill batch (``seq_lens`` include the chunk; ``qsl`` = query_start_loc)."""
    seq_len = tl.load(seq_lens_ptr + b)
    q_begin = tl.load(qsl_ptr + b)
    q_end = tl.load(qsl_ptr + b + 1)
    return seq_len, q_begin, seq_len - (q_end - q_begin)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_q_blocks", "stride_bt", "stride_li", "stride_lh", "stride_ci", "stride_ch",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr", "qsl_ptr", "qb_seq_ptr", "qb_idx_ptr",
    ],
)
def _block_sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    block_table_ptr, seq_lens_ptr, qsl_ptr,
    qb_seq_ptr, qb_idx_ptr,
    list_ptr, count_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_q_blocks,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_li, stride_lh, stride_lk,
    stride_ci, stride_ch,
    G: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # queries per program (BLOCK_Q * G_PAD tile rows)
    SPLIT: tl.constexpr,  # BLOCK_SIZE // BLOCK_Q programs per query block
    BLOCK_SIZE: tl.constexpr,  # list granularity (query and key blocks)
    BLOCK_N: tl.constexpr,  # key tile; divides BLOCK_SIZE
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: fp32 dot operands
    CAUSAL_SKIP: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # Last query blocks (most keys) first: shorter tail.
    slot = num_q_blocks - 1 - pid // SPLIT
    sub = pid % SPLIT
    b = tl.load(qb_seq_ptr + slot)
    if b < 0:
        return
    qblk = tl.load(qb_idx_ptr + slot)
    seq_len, q_begin, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    pos_lo = qblk * BLOCK_SIZE + sub * BLOCK_Q
    if pos_lo + BLOCK_Q <= chunk_start:  # sub-block before the chunk (first, partial block)
        return
    if pos_lo >= seq_len:  # sub-block after the chunk (last, partial block)
        return

    ROWS: tl.constexpr = BLOCK_Q * G_PAD
    rows = tl.arange(0, ROWS)
    r_tok = rows // G_PAD
    r_head = rows % G_PAD
    qpos = pos_lo + r_tok
    row_ok = (qpos >= chunk_start) & (qpos < seq_len) & (r_head < G)
    q_tok = (q_begin + qpos - chunk_start).to(tl.int64)
    head = kvh * G + r_head
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

    n_listed = tl.load(count_ptr + slot * stride_ci + kvh * stride_ch)
    list_base = list_ptr + slot.to(tl.int64) * stride_li + kvh * stride_lh
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    for t in range(0, n_listed):
        kblk = tl.load(list_base + t * stride_lk)
        for sub_n in tl.static_range(BLOCK_SIZE // BLOCK_N):
            k_lo = kblk * BLOCK_SIZE + sub_n * BLOCK_N
            kpos = k_lo + offs_n
            k_ok = kpos < seq_len
            if PAGE_SIZE % BLOCK_N == 0:
                page = tl.load(bt_row + k_lo // PAGE_SIZE, mask=k_lo < seq_len, other=0).to(tl.int64)
                k_off = page * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_ks
                v_off = page * stride_vp + (kpos % PAGE_SIZE).to(tl.int64) * stride_vs
            else:
                page = tl.load(bt_row + kpos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
                in_page = (kpos % PAGE_SIZE).to(tl.int64)
                k_off = page * stride_kp + in_page * stride_ks
                v_off = page * stride_vp + in_page * stride_vs
            k = tl.load(
                k_head + k_off[None, :] + offs_d[:, None] * stride_kd,
                mask=k_ok[None, :], other=0.0,
            )  # [HEAD_DIM, BLOCK_N]
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            if CAUSAL_SKIP:
                # Only tiles reaching past the first query need the mask (diagonal, past
                # seq_len, or listed above the diagonal); the loads and dots stay unconditional.
                if k_lo + BLOCK_N - 1 > pos_lo:
                    s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
            else:
                s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_head + v_off[:, None] + offs_d[None, :] * stride_vd,
                mask=k_ok[:, None], other=0.0,
            )  # [BLOCK_N, HEAD_DIM]
            p_in = p.to(v.dtype)
            if UPCAST:
                p_in = p_in.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


_CAUSAL_SKIP = True  # mask only the tiles that need it (module knob for A/B timing)


def _tile_config(block_size: int, group: int, head_dim: int) -> dict:
    """Tile sizes for the sparse kernel: up to 256 rows of (query, head) pairs per program.

    Measured on H100 (bench_prefill.py shapes, 16K chunk at 128K, full density, block 64):
    256 rows / 16 warps / 3 stages ~400 TF/s; 128 rows / 8 warps ~270; 128 rows / 4 warps ~260.
    A 128-key tile with 256 rows spills registers (~30x slower): keep BLOCK_N at 64.
    """
    g_pad = next_power_of_2(group)
    block_q = max(1, min(block_size, 256 // g_pad))
    if block_q * g_pad < 16:  # tl.dot needs M >= 16
        block_q = min(block_size, 16 // g_pad)
    block_n = min(block_size, 64)
    rows = block_q * g_pad
    return {
        "G_PAD": g_pad,
        "BLOCK_Q": block_q,
        "SPLIT": block_size // block_q,
        "BLOCK_N": block_n,
        "num_warps": 16 if rows >= 256 else (8 if rows >= 128 else 4),
        "num_stages": 3,
    }


def block_sparse_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of the ragged prefill batch described by ``meta``.

    q ``[num_tokens, Hq, D]`` (any strides); k_cache / v_cache ``[num_pages, page_size, Hkv, D]``
    (any strides: NHD, HND, vLLM interleaved); block_table int32 ``[batch, max_pages]``;
    block_idx int32 ``[meta.num_q_blocks, Hkv, >=1]`` and block_count int32
    ``[meta.num_q_blocks, Hkv]`` (any strides; a stride-0 broadcast is fine). D in {64, 128}
    (any power of two >= 16 works). Returns ``out`` ``[num_tokens, Hq, D]`` in q's dtype; rows of
    query heads whose lists are empty get zeros.
    """
    num_tokens, hq, d = q.shape
    num_pages, page_size, hkv, dk = k_cache.shape
    if dk != d or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} vs q {q.shape}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if block_idx.shape[:2] != (meta.num_q_blocks, hkv) or block_count.shape != (meta.num_q_blocks, hkv):
        raise ValueError(
            f"block lists {tuple(block_idx.shape)}/{tuple(block_count.shape)} do not match "
            f"{meta.num_q_blocks} query blocks x {hkv} KV heads"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = hq // hkv
    cfg = _tile_config(meta.block_size, group, d)
    grid = (meta.num_q_blocks * cfg["SPLIT"], hkv)
    _block_sparse_prefill_kernel[grid](
        q, k_cache, v_cache, out,
        block_table, meta.seq_lens, meta.query_start_loc,
        meta.q_block_seq, meta.q_block_idx,
        block_idx, block_count,
        scale * 1.4426950408889634,
        meta.num_q_blocks,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *k_cache.stride(), *v_cache.stride(),
        block_table.stride(0),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_count.stride(0), block_count.stride(1),
        G=group,
        G_PAD=cfg["G_PAD"],
        BLOCK_Q=cfg["BLOCK_Q"],
        SPLIT=cfg["SPLIT"],
        BLOCK_SIZE=meta.block_size,
        BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=d,
        PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret_upcast(q.dtype),
        CAUSAL_SKIP=_CAUSAL_SKIP,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out

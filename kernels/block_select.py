"""Turn per-head block evidence into per-KV-head block lists for the sparse prefill kernel.

One Triton program per (query-block slot, KV head) walks the causal key blocks ``0..i`` of its
query block ``i`` and keeps key block ``j`` when

* ``j == 0`` (first block, attention sink) or ``j == i`` (diagonal) -- always; or
* window rule (streaming): ``j < sink_blocks`` or ``i - local_blocks <= j < i``; or
* score rule (XAttention, FlexPrefill query-aware heads): for some query head ``g`` of the GQA
  group whose score rule is on, ``p_g[j] >= tau_g``, where ``p_g`` is that head's block
  distribution over ``0..i`` and ``tau_g`` the largest cut such that the kept blocks (the two
  forced ones included) carry at least ``threshold`` of the row's mass -- the smallest such set up
  to ties, found by bisection on the cut value instead of a sort; or
* vertical/slash rule (MInference, FlexPrefill vertical-slash heads): for some query head ``g``
  whose rule is on, ``vertical[b, g, j]`` (block ``j`` holds a kept column) or
  ``slash[b, g, i - j]`` (a kept diagonal crosses block offset ``i - j``).

The union over the GQA group keeps the kernel GQA-native: every query head of the group gets at
least the blocks its own rule asked for. Kept blocks are written in ascending order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta, block_density
from sparse_kernels.host_math import next_power_of_2

__all__ = ["build_block_lists"]


@triton.jit
def _row_probs(score_ptr, srow_off, kb, ok2, row_max, row_sum, LOGITS: tl.constexpr):
    """[G_PAD, BLOCK_K] probabilities of one tile of score rows (0 outside ``ok2``)."""
    x = tl.load(score_ptr + srow_off[:, None] + kb[None, :], mask=ok2, other=0.0)
    if LOGITS:
        x = tl.exp(x - row_max[:, None]) / row_sum[:, None]
    return tl.where(ok2, x, 0.0)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_si", "stride_sh", "stride_eb", "stride_eh", "stride_vb", "stride_vh",
        "stride_db", "stride_dh", "stride_fb", "stride_fh", "stride_oi", "stride_oh",
        "stride_ci", "stride_ch", "sink_blocks", "local_blocks",
    ],
    do_not_specialize_on_alignment=[
        "qb_seq_ptr", "qb_idx_ptr",
    ],
)
def _build_block_lists_kernel(
    qb_seq_ptr, qb_idx_ptr,
    score_ptr, stride_si, stride_sh, stride_sk,
    score_on_ptr, stride_eb, stride_eh,
    vert_ptr, stride_vb, stride_vh, stride_vk,
    band_ptr, stride_db, stride_dh, stride_dk,
    vs_on_ptr, stride_fb, stride_fh,
    out_idx_ptr, stride_oi, stride_oh, stride_ok,
    out_cnt_ptr, stride_ci, stride_ch,
    threshold, sink_blocks, local_blocks,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    LOGITS: tl.constexpr,
    KEEP_ALL: tl.constexpr,
    HAS_VS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    N_BISECT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    slot = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(qb_seq_ptr + slot)
    cnt_ptr = out_cnt_ptr + slot * stride_ci + kvh * stride_ch
    if b < 0:
        tl.store(cnt_ptr, 0)
        return
    i = tl.load(qb_idx_ptr + slot)
    n = i + 1
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    head = kvh * G + g
    offs_k = tl.arange(0, BLOCK_K)

    if HAS_SCORES:
        s_on = tl.load(score_on_ptr + b * stride_eb + head * stride_eh, mask=g_ok, other=0) != 0
        s_on = s_on & g_ok
        srow_off = slot.to(tl.int64) * stride_si + head * stride_sh
        row_max = tl.zeros([G_PAD], dtype=tl.float32)
        row_sum = tl.full([G_PAD], 1.0, dtype=tl.float32)
        tau = tl.full([G_PAD], float("inf"), dtype=tl.float32)
        scores_on = tl.max(s_on.to(tl.int32), 0) > 0
        if scores_on:  # no head of the group selects by score (FlexPrefill VS heads): skip
            if LOGITS:  # softmax statistics over the causal blocks
                # Loops accumulate whole tiles and reduce once afterwards (a reduction inside a
                # loop feeding a loop-carried vector crashes Triton 3.6's OptimizeThreadLocality).
                acc = tl.full([G_PAD, BLOCK_K], -1.0e30, dtype=tl.float32)
                for k0 in range(0, n, BLOCK_K):
                    kb = k0 + offs_k
                    ok2 = g_ok[:, None] & (kb < n)[None, :]
                    x = tl.load(score_ptr + srow_off[:, None] + kb[None, :] * stride_sk, mask=ok2,
                                other=-1.0e30)
                    acc = tl.maximum(acc, x)
                row_max = tl.max(acc, 1)
                acc = tl.zeros([G_PAD, BLOCK_K], dtype=tl.float32)
                for k0 in range(0, n, BLOCK_K):
                    kb = k0 + offs_k
                    ok2 = g_ok[:, None] & (kb < n)[None, :]
                    x = tl.load(score_ptr + srow_off[:, None] + kb[None, :] * stride_sk, mask=ok2,
                                other=-1.0e30)
                    acc += tl.where(ok2, tl.exp(x - row_max[:, None]), 0.0)
                row_sum = tl.sum(acc, 1)
                row_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
            if KEEP_ALL:
                tau = tl.where(s_on, -1.0, float("inf"))
            elif SINGLE_TILE:  # the whole row lives in registers
                kb = offs_k
                ok2 = g_ok[:, None] & (kb < n)[None, :]
                p = _row_probs(score_ptr, srow_off, kb * stride_sk, ok2, row_max, row_sum, LOGITS)
                is_forced = ((kb == 0) | (kb == i))[None, :]
                free_p = tl.where(is_forced, 0.0, p)
                target = threshold * tl.sum(p, 1)
                forced = tl.sum(tl.where(is_forced, p, 0.0), 1)
                # {p >= lo} (+ forced) reaches the target, {p >= hi} does not.
                hi = 2.0 * tl.max(free_p, 1) + 1.0e-30
                lo = tl.zeros([G_PAD], dtype=tl.float32)
                for _ in range(N_BISECT):
                    mid = 0.5 * (lo + hi)
                    mass = forced + tl.sum(tl.where(free_p >= mid[:, None], free_p, 0.0), 1)
                    reached = mass >= target
                    lo = tl.where(reached, mid, lo)
                    hi = tl.where(reached, hi, mid)
                lo = tl.where(forced >= target, hi, lo)
                tau = tl.where(s_on, lo, float("inf"))
            else:
                acc_p = tl.zeros([G_PAD, BLOCK_K], dtype=tl.float32)
                acc_f = tl.zeros([G_PAD, BLOCK_K], dtype=tl.float32)
                acc_h = tl.zeros([G_PAD, BLOCK_K], dtype=tl.float32)
                for k0 in range(0, n, BLOCK_K):
                    kb = k0 + offs_k
                    ok2 = g_ok[:, None] & (kb < n)[None, :]
                    p = _row_probs(score_ptr, srow_off, kb * stride_sk, ok2, row_max, row_sum, LOGITS)
                    is_forced = ((kb == 0) | (kb == i))[None, :]
                    acc_p += p
                    acc_f += tl.where(is_forced, p, 0.0)
                    acc_h = tl.maximum(acc_h, tl.where(is_forced, 0.0, p))
                target = threshold * tl.sum(acc_p, 1)
                forced = tl.sum(acc_f, 1)
                hi = 2.0 * tl.max(acc_h, 1) + 1.0e-30
                lo = tl.zeros([G_PAD], dtype=tl.float32)
                for _ in range(N_BISECT):
                    mid = 0.5 * (lo + hi)
                    acc_m = tl.zeros([G_PAD, BLOCK_K], dtype=tl.float32)
                    for k0 in range(0, n, BLOCK_K):
                        kb = k0 + offs_k
                        ok2 = g_ok[:, None] & (kb < n)[None, :]
                        p = _row_probs(score_ptr, srow_off, kb * stride_sk, ok2, row_max, row_sum,
                                       LOGITS)
                        free = ok2 & ((kb != 0) & (kb != i))[None, :]
                        acc_m += tl.where(free & (p >= mid[:, None]), p, 0.0)
                    reached = (forced + tl.sum(acc_m, 1)) >= target
                    lo = tl.where(reached, mid, lo)
                    hi = tl.where(reached, hi, mid)
                lo = tl.where(forced >= target, hi, lo)
                tau = tl.where(s_on, lo, float("inf"))
    if HAS_VS:
        v_on = tl.load(vs_on_ptr + b * stride_fb + head * stride_fh, mask=g_ok, other=0) != 0
        v_on = v_on & g_ok
        vrow = vert_ptr + b.to(tl.int64) * stride_vb + head * stride_vh
        drow = band_ptr + b.to(tl.int64) * stride_db + head * stride_dh

    count = 0
    out_row = out_idx_ptr + slot.to(tl.int64) * stride_oi + kvh * stride_oh
    for k0 in range(0, n, BLOCK_K):
        kb = k0 + offs_k
        in_rng = kb < n
        keep = (kb == 0) | (kb == i)
        if HAS_WINDOW:
            keep = keep | (kb < sink_blocks) | (i - kb <= local_blocks)
        if HAS_SCORES:
            if scores_on:
                ok2 = s_on[:, None] & in_rng[None, :]
                p = _row_probs(score_ptr, srow_off, kb * stride_sk, ok2, row_max, row_sum,
                               LOGITS)
                hit = ok2 & (p >= tau[:, None])
                keep = keep | (tl.max(hit.to(tl.int32), 0) > 0)
        if HAS_VS:
            ok2 = v_on[:, None] & in_rng[None, :]
            vm = tl.load(vrow[:, None] + kb[None, :] * stride_vk, mask=ok2, other=0)
            bm = tl.load(drow[:, None] + (i - kb)[None, :] * stride_dk, mask=ok2, other=0)
            hit = (vm != 0) | (bm != 0)
            keep = keep | (tl.max(hit.to(tl.int32), 0) > 0)
        keep = keep & in_rng
        k32 = keep.to(tl.int32)
        pos = count + tl.cumsum(k32, 0) - 1
        tl.store(out_row + pos * stride_ok, kb, mask=keep)
        count += tl.sum(k32, 0)
    tl.store(cnt_ptr, count)


def build_block_lists(
    meta: PrefillBlockMeta,
    num_kv_heads: int,
    *,
    scores: torch.Tensor | None = None,
    scores_are_logits: bool = False,
    score_rows_on: torch.Tensor | None = None,
    threshold: float = 1.0,
    vertical_blocks: torch.Tensor | None = None,
    slash_bands: torch.Tensor | None = None,
    vs_rows_on: torch.Tensor | None = None,
    sink_blocks: int | None = None,
    local_blocks: int | None = None,
    n_bisect: int = 24,
    max_block_k: int = 8192,
) -> PrefillBlockLists:
    """Block lists for :func:`block_sparse_prefill_attention` (see module docstring).

    scores: fp32 ``[num_q_blocks, Hq, >= max_kv_blocks]`` per-query-block distributions over key
    blocks (``scores_are_logits``: unnormalised logits, softmaxed over ``0..i`` here); only
    entries ``0..i`` of each row are read. ``threshold`` is the mass to keep (>= 1 keeps every
    causal block of the rows that are on). score_rows_on: bool ``[batch, Hq]`` (default all on).
    vertical_blocks / slash_bands: int8/bool ``[batch, Hq, >= max_kv_blocks]`` (block ``j`` holds a
    kept column / a kept diagonal crosses block offset ``δ``); vs_rows_on bool ``[batch, Hq]``.
    sink_blocks / local_blocks: window rule (streaming). Returns lists for ``num_kv_heads``.
    ``n_bisect``: bisection steps of the mass cut; ``max_block_k``: register tile (elements per
    program) -- rows longer than ``max_block_k / G`` blocks are streamed in chunks.
    """
    dev = meta.q_block_seq.device
    nqb, nkb = meta.num_q_blocks, meta.max_kv_blocks
    hq = None
    for t in (scores, vertical_blocks):
        if t is not None:
            hq = t.shape[1]
    group = 1 if hq is None else hq // num_kv_heads
    if hq is not None and hq != group * num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    g_pad = next_power_of_2(group)
    block_k = min(next_power_of_2(nkb), max(16, max_block_k // g_pad))
    dummy = torch.zeros(1, 1, 1, device=dev, dtype=torch.float32)
    on_all = torch.ones(1, 1, device=dev, dtype=torch.int8)

    has_scores = scores is not None
    if has_scores:
        if scores.shape[0] != nqb or scores.shape[2] < nkb:
            raise ValueError(f"scores {tuple(scores.shape)} vs {nqb} query blocks x {nkb} key blocks")
        s_on = on_all.expand(meta.batch_size, hq) if score_rows_on is None else score_rows_on.to(torch.int8)
    else:
        scores, s_on = dummy, on_all
    has_vs = vertical_blocks is not None
    if has_vs:
        if slash_bands is None:
            raise ValueError("vertical_blocks needs slash_bands")
        vert = vertical_blocks.to(torch.int8) if vertical_blocks.dtype == torch.bool else vertical_blocks
        band = slash_bands.to(torch.int8) if slash_bands.dtype == torch.bool else slash_bands
        v_on = on_all.expand(meta.batch_size, hq) if vs_rows_on is None else vs_rows_on.to(torch.int8)
    else:
        vert = band = dummy.to(torch.int8)
        v_on = on_all
    has_window = sink_blocks is not None or local_blocks is not None
    sink = int(sink_blocks or 0)
    local = -1 if local_blocks is None else int(local_blocks)

    block_idx = torch.empty(nqb, num_kv_heads, nkb, device=dev, dtype=torch.int32)
    block_count = torch.empty(nqb, num_kv_heads, device=dev, dtype=torch.int32)
    _build_block_lists_kernel[(nqb, num_kv_heads)](
        meta.q_block_seq, meta.q_block_idx,
        scores, scores.stride(0), scores.stride(1), scores.stride(2),
        s_on, s_on.stride(0), s_on.stride(1),
        vert, vert.stride(0), vert.stride(1), vert.stride(2),
        band, band.stride(0), band.stride(1), band.stride(2),
        v_on, v_on.stride(0), v_on.stride(1),
        block_idx, block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_count, block_count.stride(0), block_count.stride(1),
        float(threshold), sink, local,
        G=group,
        G_PAD=g_pad,
        BLOCK_K=block_k,
        HAS_SCORES=has_scores,
        LOGITS=bool(scores_are_logits),
        KEEP_ALL=threshold >= 1.0,
        HAS_VS=has_vs,
        HAS_WINDOW=has_window,
        N_BISECT=n_bisect,
        SINGLE_TILE=block_k >= nkb,
        num_warps=4,
    )
    return PrefillBlockLists(block_idx, block_count, block_density(meta, block_count))

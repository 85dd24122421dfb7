"""FlexPrefill block selection (query-aware vs vertical-slash heads) for sparse prefill.

Per sequence and query head, with ``n = min(B, q_len)`` the last queries of the chunk:

1. ``a_true``: their true attention (``last_q_scores``), summed per key block;
   ``a_hat``: softmax over key blocks of (mean of those queries) . (mean key of each block)
   -- the pooled estimate. ``js = sqrt(JSD(a_hat, a_true))`` (FlexPrefill's square-root JS).
2. ``js < tau``: query-aware head. Every query block ``i`` scores the causal key blocks by
   softmax of (mean query of the block) . (block-mean keys) and keeps the smallest set with
   cumulative probability >= ``gamma`` (per query block; FlexPrefill ranks the whole pooled
   matrix at once -- per-row selection is the causal-chunk friendly variant).
3. Otherwise vertical-slash head: budgets from the last queries' attention -- the number of
   key tokens (resp. diagonals) whose sorted cumulative mass first reaches ``gamma``, turned
   into ``tokens // B + 1`` blocks as FlexPrefill does -- then the top key blocks by pooled
   vertical mass and the top block offsets ``δ = i - j`` by pooled slash mass (ties: lowest
   index first).

Blocks ``0`` and ``i`` are always kept; lists are the union over each GQA group. All on device,
no sort: ``last_q_score_planes``, the budgets by a radix select on mass (``mass_cut``), the top
blocks by a radix select on count with a k per row (``radix_select``), block-mean keys, pooled
logits and ``build_block_lists``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta
from sparse_kernels.host_math import cdiv, next_power_of_2
from sparse_kernels.last_q_scores import DEFAULT_BLOCK_N, last_q_score_planes
from sparse_kernels.mass_cut import cover_counts
from sparse_kernels.radix_select import radix_keep_mask, radix_select_cut

__all__ = ["block_mean_keys", "pooled_block_logits", "flexprefill_parts", "estimate_flexprefill"]

# Pooled query-aware logits (H100, 112K + 16K, bench_flex_select.py --pooled-configs, session
# 25): one program per pack of query-block slots x padded GQA group = 32 rows reads each
# block-mean key tile once for all of them; 16 or 64 rows, and splitting a pack's key tiles
# over 4-8 programs (with the block-mean queries from a kernel of their own) were slower.
POOLED_ROWS = 32
POOLED_BLOCK_J = 64  # key blocks per tile
POOLED_DOT_PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_bt", "stride_ob", "stride_oh",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr",
    ],
)
def _block_mean_k_kernel(
    k_ptr, block_table_ptr, seq_lens_ptr, out_ptr,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_bt,
    stride_ob, stride_oh, stride_oj,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    j = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    if j * BLOCK_SIZE >= seq_len:
        return
    kpos = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    ok = kpos < seq_len
    page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + kpos // PAGE_SIZE, mask=ok,
                   other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    k_off = page * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_ks + kvh * stride_kh
    k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :] * stride_kd, mask=ok[:, None], other=0.0)
    mean = tl.sum(k.to(tl.float32), 0) / tl.sum(ok.to(tl.float32), 0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + kvh * stride_oh + j * stride_oj + offs_d, mean)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "num_slots", "stride_kb", "stride_kh", "stride_oi", "stride_oh",
    ],
    do_not_specialize_on_alignment=[
        "qb_seq_ptr", "qb_idx_ptr", "qb_tok_start_ptr", "qb_tok_len_ptr",
    ],
)
def _pooled_logits_kernel(
    q_ptr, kbar_ptr, out_ptr,
    qb_seq_ptr, qb_idx_ptr, qb_tok_start_ptr, qb_tok_len_ptr,
    scale, num_slots,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kj,
    stride_oi, stride_oh, stride_ok,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    SLOTS: tl.constexpr,  # query-block slots per program: SLOTS * G_PAD rows share each kbar tile
    BLOCK_SIZE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pack = tl.program_id(0)
    kvh = tl.program_id(1)
    ROWS: tl.constexpr = SLOTS * G_PAD
    rows = tl.arange(0, ROWS)
    slot = pack * SLOTS + rows // G_PAD
    g = rows % G_PAD
    s_ok = slot < num_slots
    b = tl.load(qb_seq_ptr + slot, mask=s_ok, other=-1)
    i = tl.load(qb_idx_ptr + slot, mask=s_ok, other=0)
    t0 = tl.load(qb_tok_start_ptr + slot, mask=s_ok, other=0)
    nq = tl.load(qb_tok_len_ptr + slot, mask=s_ok, other=0)
    r_ok = (b >= 0) & (g < G)
    head = kvh * G + g
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + t0.to(tl.int64) * stride_qt + head * stride_qh
    qbar = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for t in range(0, BLOCK_SIZE):  # the mean query of each row's block
        t_ok = r_ok & (t < nq)
        x = tl.load(q_rows[:, None] + t * stride_qt + offs_d[None, :] * stride_qd,
                    mask=t_ok[:, None], other=0.0)
        qbar += x.to(tl.float32)
    qbar = qbar / tl.maximum(nq, 1).to(tl.float32)[:, None]
    out_row = out_ptr + slot.to(tl.int64) * stride_oi + head * stride_oh
    # slots are ordered by sequence: the pack's rows span sequences b_lo..b_hi, each with its
    # own block-mean keys
    b_lo = tl.min(tl.where(r_ok, b, 2147483647), 0)
    b_hi = tl.max(tl.where(r_ok, b, -1), 0)
    for n in range(0, b_hi - b_lo + 1):
        bb = b_lo + n
        on = r_ok & (b == bb)
        i_max = tl.max(tl.where(on, i, -1), 0)
        kbar_row = kbar_ptr + bb.to(tl.int64) * stride_kb + kvh * stride_kh
        for j0 in range(0, i_max + 1, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kb = tl.load(kbar_row + j[None, :] * stride_kj + offs_d[:, None],
                         mask=(j <= i_max)[None, :], other=0.0)  # [HEAD_DIM, BLOCK_J]
            lg = tl.dot(qbar, kb, input_precision=DOT_PRECISION) * scale
            tl.store(out_row[:, None] + j[None, :] * stride_ok, lg,
                     mask=on[:, None] & (j[None, :] <= i[:, None]))


def block_mean_keys(k_cache: torch.Tensor, block_table: torch.Tensor, meta: PrefillBlockMeta) -> torch.Tensor:
    """fp32 ``[batch, Hkv, max_kv_blocks, D]``: mean key of every key block (0 past seq_len)."""
    page_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    nkb = meta.max_kv_blocks
    out = torch.zeros(meta.batch_size, hkv, nkb, d, device=k_cache.device, dtype=torch.float32)
    _block_mean_k_kernel[(nkb, hkv, meta.batch_size)](
        k_cache, block_table, meta.seq_lens, out,
        *k_cache.stride(), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_SIZE=meta.block_size, HEAD_DIM=d, PAGE_SIZE=page_size,
        num_warps=4,
    )
    return out


def pooled_block_logits(q: torch.Tensor, kbar: torch.Tensor, meta: PrefillBlockMeta,
                        scale: float) -> torch.Tensor:
    """fp32 ``[num_q_blocks, Hq, max_kv_blocks]``: (mean query of block i) . kbar[j] * scale for
    ``j <= i`` (other entries unspecified)."""
    _t, hq, d = q.shape
    hkv = kbar.shape[1]
    group = hq // hkv
    nkb = meta.max_kv_blocks
    out = torch.empty(meta.num_q_blocks, hq, nkb, device=q.device, dtype=torch.float32)
    g_pad = next_power_of_2(group)
    slots = max(1, POOLED_ROWS // g_pad)
    _pooled_logits_kernel[(cdiv(meta.num_q_blocks, slots), hkv)](
        q, kbar, out,
        meta.q_block_seq, meta.q_block_idx, meta.q_block_tok_start, meta.q_block_tok_len,
        scale, meta.num_q_blocks,
        q.stride(0), q.stride(1), q.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=group, G_PAD=g_pad, SLOTS=slots, BLOCK_SIZE=meta.block_size,
        BLOCK_J=POOLED_BLOCK_J, HEAD_DIM=d,
        DOT_PRECISION=POOLED_DOT_PRECISION if q.is_cuda else "ieee",
        num_warps=4,
    )
    return out


def flexprefill_parts(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    gamma: float,
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Intermediate FlexPrefill quantities (device tensors): ``a_true``, ``a_hat`` ``[B, Hq, nkb]``,
    ``js`` ``[B, Hq]``, ``v_blocks``, ``s_bands`` int8 ``[B, Hq, nkb]``, ``logits``
    ``[num_q_blocks, Hq, nkb]`` (pooled query-aware logits, rows ``0..i`` valid)."""
    _t, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    bs, nkb, batch = meta.block_size, meta.max_kv_blocks, meta.batch_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev = q.device
    if bs == DEFAULT_BLOCK_N:  # pass 1 of the last queries' scores writes the block-mean keys
        kbar = torch.zeros(batch, hkv, nkb, d, device=dev, dtype=torch.float32)
        planes = last_q_score_planes(q, k_cache, block_table, meta, last_q=bs, scale=scale,
                                     block_mean_keys=kbar)
    else:
        planes = last_q_score_planes(q, k_cache, block_table, meta, last_q=bs, scale=scale)
        kbar = block_mean_keys(k_cache, block_table, meta)  # [B, Hkv, nkb, D]
    pooled = planes.view(2, batch, hq, nkb, bs).sum(-1)  # [2, B, Hq, nkb]: a_true, s_pool
    a_true = pooled[0]
    seq_lens = meta.seq_lens.long()
    n_blocks = torch.div(seq_lens + bs - 1, bs, rounding_mode="floor")  # [B]
    blk_valid = torch.arange(nkb, device=dev)[None, :] < n_blocks[:, None]  # [B, nkb]
    n_blocks_i32 = n_blocks.to(torch.int32)
    if gamma >= 1.0:
        n_keep = n_blocks_i32.repeat_interleave(hq)[None, :].expand(2, -1).contiguous()
    else:  # blocks for the tokens (diagonals) whose sorted cumulative mass first reaches gamma
        n_keep = cover_counts(planes.view(2, batch * hq, nkb * bs), meta.seq_lens, hq, gamma, bs)
    # the top n_keep key blocks by pooled vertical mass and block offsets by pooled slash mass
    rows = pooled.view(2, batch * hq, nkb)
    cut = radix_select_cut(rows, n_blocks_i32, hq, n_keep)
    keep = radix_keep_mask(rows, n_blocks_i32, hq, cut).view(2, batch, hq, nkb)
    v_blocks, s_bands = keep[0], keep[1]

    qsl = meta.query_start_loc.long()
    q_end = qsl[1:]
    n_last = torch.clamp(q_end - qsl[:-1], max=bs)  # [B]
    r = torch.arange(bs, device=dev)
    # rows past a chunk shorter than a block are masked by r_ok; clamped into that chunk so
    # the gather stays in bounds (the batch's last chunk ends at the end of q)
    tok = torch.minimum(q_end[:, None] - n_last[:, None] + r[None, :], q_end[:, None] - 1)
    tok = tok.clamp(min=0)
    r_ok = (r[None, :] < n_last[:, None]).float()  # [B, bs]
    qlast = q[tok.view(-1)].view(batch, bs, hq, d).float() * r_ok[:, :, None, None]
    qbar = qlast.sum(1) / n_last.clamp(min=1)[:, None, None].float()  # [B, Hq, D]
    lg = torch.einsum("bhgd,bhjd->bhgj", qbar.view(batch, hkv, group, d), kbar)
    lg = lg.reshape(batch, hq, nkb) * scale
    a_hat = torch.softmax(lg.masked_fill(~blk_valid[:, None, :], float("-inf")), -1)
    m = 0.5 * (a_hat + a_true)
    kl_hat = (torch.xlogy(a_hat, a_hat) - torch.xlogy(a_hat, m)).sum(-1)
    kl_true = (torch.xlogy(a_true, a_true) - torch.xlogy(a_true, m)).sum(-1)
    js = torch.sqrt(torch.clamp(0.5 * kl_hat + 0.5 * kl_true, min=0.0))
    logits = pooled_block_logits(q, kbar, meta, scale)
    return {"a_true": a_true, "a_hat": a_hat, "js": js, "v_blocks": v_blocks,
            "s_bands": s_bands, "logits": logits}


def estimate_flexprefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    gamma: float,
    tau: float,
    scale: float | None = None,
) -> PrefillBlockLists:
    """FlexPrefill lists ``[meta.num_q_blocks, Hkv, meta.max_kv_blocks]`` + counts + density.

    ``gamma`` = config ``flex_gamma`` (cumulative attention to keep, (0, 1]); ``tau`` =
    ``flex_tau`` (heads with sqrt-JS divergence below it use query-aware selection).
    """
    parts = flexprefill_parts(q, k_cache, block_table, meta, gamma=gamma, scale=scale)
    qa = parts["js"] < tau
    return build_block_lists(
        meta, k_cache.shape[2],
        scores=parts["logits"], scores_are_logits=True, score_rows_on=qa, threshold=gamma,
        vertical_blocks=parts["v_blocks"], slash_bands=parts["s_bands"], vs_rows_on=~qa,
    )

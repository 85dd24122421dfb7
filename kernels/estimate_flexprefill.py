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
   vertical mass and the top block offsets ``δ = i - j`` by pooled slash mass.

Blocks ``0`` and ``i`` are always kept; lists are the union over each GQA group. All on device:
``last_q_scores`` (2 Triton launches), block-mean keys and pooled logits (1 launch each), a few
sorts, and ``build_block_lists``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta
from sparse_kernels.host_math import next_power_of_2
from sparse_kernels.last_q_scores import last_q_scores

__all__ = ["block_mean_keys", "pooled_block_logits", "flexprefill_parts", "estimate_flexprefill"]


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
        "stride_kb", "stride_kh", "stride_oi", "stride_oh",
    ],
    do_not_specialize_on_alignment=[
        "qb_seq_ptr", "qb_idx_ptr", "qb_tok_start_ptr", "qb_tok_len_ptr",
    ],
)
def _pooled_logits_kernel(
    q_ptr, kbar_ptr, out_ptr,
    qb_seq_ptr, qb_idx_ptr, qb_tok_start_ptr, qb_tok_len_ptr,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kj,
    stride_oi, stride_oh, stride_ok,
    G: tl.constexpr,
    ROWS: tl.constexpr,  # max(16, next_pow2(G))
    BLOCK_SIZE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    slot = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(qb_seq_ptr + slot)
    if b < 0:
        return
    i = tl.load(qb_idx_ptr + slot)
    t0 = tl.load(qb_tok_start_ptr + slot)
    nq = tl.load(qb_tok_len_ptr + slot)
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    toks = tl.arange(0, BLOCK_SIZE)
    t_ok = toks < nq
    q_rows = q_ptr + (t0 + toks).to(tl.int64) * stride_qt
    qbar = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for g in tl.static_range(G):
        x = tl.load(q_rows[:, None] + (kvh * G + g) * stride_qh + offs_d[None, :] * stride_qd,
                    mask=t_ok[:, None], other=0.0)
        xm = tl.sum(x.to(tl.float32), 0) / nq.to(tl.float32)
        qbar = tl.where(rows[:, None] == g, xm[None, :], qbar)
    kbar_row = kbar_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    out_row = out_ptr + slot.to(tl.int64) * stride_oi + (kvh * G + rows) * stride_oh
    for j0 in range(0, i + 1, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j <= i
        kb = tl.load(kbar_row + j[None, :] * stride_kj + offs_d[:, None], mask=j_ok[None, :],
                     other=0.0)  # [HEAD_DIM, BLOCK_J]
        lg = tl.dot(qbar, kb, input_precision=DOT_PRECISION) * scale
        tl.store(out_row[:, None] + j[None, :] * stride_ok, lg,
                 mask=(rows < G)[:, None] & j_ok[None, :])


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
    _pooled_logits_kernel[(meta.num_q_blocks, hkv)](
        q, kbar, out,
        meta.q_block_seq, meta.q_block_idx, meta.q_block_tok_start, meta.q_block_tok_len,
        scale,
        q.stride(0), q.stride(1), q.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=group, ROWS=max(16, next_power_of_2(group)), BLOCK_SIZE=meta.block_size,
        BLOCK_J=64, HEAD_DIM=d,
        DOT_PRECISION="tf32x3" if q.is_cuda else "ieee",  # ~fp32 accuracy on tensor cores
        num_warps=4,
    )
    return out


def _cover_blocks(x: torch.Tensor, valid: torch.Tensor, gamma: float, block_size: int,
                  n_blocks: torch.Tensor) -> torch.Tensor:
    """FlexPrefill budget: tokens whose sorted cumulative mass first reaches gamma, // B + 1."""
    srt = torch.sort(torch.where(valid, x, 0.0), dim=-1, descending=True).values
    ntok = (torch.cumsum(srt, -1) <= gamma).sum(-1) + 1
    return torch.minimum(torch.clamp(ntok // block_size + 1, min=1), n_blocks)


def _top_rank_mask(pooled: torch.Tensor, valid: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """int8 mask of the ``n_keep[..., None]`` largest valid entries of each row."""
    order = torch.argsort(torch.where(valid, pooled, -1.0), dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ((rank < n_keep[..., None]) & valid).to(torch.int8)


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
    vertical, slash = last_q_scores(q, k_cache, block_table, meta, last_q=bs, scale=scale)
    a_true = vertical.view(batch, hq, nkb, bs).sum(-1)
    s_pool = slash.view(batch, hq, nkb, bs).sum(-1)
    seq_lens = meta.seq_lens.long()
    n_blocks = torch.div(seq_lens + bs - 1, bs, rounding_mode="floor")  # [B]
    blk_valid = torch.arange(nkb, device=dev)[None, :] < n_blocks[:, None]  # [B, nkb]
    if gamma >= 1.0:
        nv = ns = n_blocks[:, None].expand(batch, hq)
    else:
        tok_valid = torch.arange(nkb * bs, device=dev)[None, :] < seq_lens[:, None]
        nv = _cover_blocks(vertical, tok_valid[:, None, :], gamma, bs, n_blocks[:, None])
        ns = _cover_blocks(slash, tok_valid[:, None, :], gamma, bs, n_blocks[:, None])
    v_blocks = _top_rank_mask(a_true, blk_valid[:, None, :], nv)
    s_bands = _top_rank_mask(s_pool, blk_valid[:, None, :], ns)

    kbar = block_mean_keys(k_cache, block_table, meta)  # [B, Hkv, nkb, D]
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

"""Vertical and slash statistics of the last queries of each chunk (MInference, FlexPrefill).

For each sequence ``b`` and query head ``h``, the last ``n_b = min(last_q, q_len_b)`` queries of
the chunk (positions ``L - n_b + r``) attend causally to all ``L`` keys of the sequence (prefix
pages included). With ``p[r, k]`` their softmax probabilities:

* ``vertical[b, h, k] = mean_r p[r, k]`` (sums to 1 over ``k``);
* ``slash[b, h, d] = mean_r p[r, L - n_b + r - d]``: probability mass on diagonal offset ``d``.

Two passes of one Triton kernel over (query head, key tile, sequence) programs, each a
``[n_pad, D] x [D, BLOCK_N]`` product: pass 1 writes per-tile row log-sum-exps (combined by
``torch.logsumexp``), pass 2 writes the normalised column sums (``vertical``) and adds the
diagonal sums of its tile into ``slash`` (``tl.gather`` skews the tile so each diagonal becomes
a column; one vector atomic add per program). No ``[n, L]`` probability matrix is materialised.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.block_sparse_prefill import (
    PrefillBlockMeta,
    chunk_of_sequence,
    interpret_upcast,
)
from sparse_kernels.host_math import cdiv, next_power_of_2

__all__ = ["last_q_scores"]

_LN2 = 0.6931471805599453


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_bt", "stride_pb", "stride_ph", "stride_pr", "stride_lb", "stride_lh",
        "stride_vb", "stride_vh", "stride_sb", "stride_sh",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr", "qsl_ptr",
    ],
)
def _last_q_kernel(
    q_ptr, k_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_ptr,  # fp32 [B, Hq, N_PAD, NKT]: per-tile row lse (base 2)       (pass 1 output)
    lse_ptr,  # fp32 [B, Hq, N_PAD]: row lse (base 2)                       (pass 2 input)
    vert_ptr, slash_ptr,  # fp32 [B, Hq, width]                             (pass 2 outputs)
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_bt,
    stride_pb, stride_ph, stride_pr, stride_pk,
    stride_lb, stride_lh,
    stride_vb, stride_vh,
    stride_sb, stride_sh,
    LAST_Q: tl.constexpr,
    N_PAD: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    W: tl.constexpr,  # next_pow2(BLOCK_N + N_PAD - 1)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    h = tl.program_id(0)
    kt = tl.program_id(1)
    b = tl.program_id(2)
    seq_len, q_begin, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    q_len = seq_len - chunk_start
    q_end = q_begin + q_len
    n_b = tl.minimum(q_len, LAST_Q)
    k0 = kt * BLOCK_N
    if (k0 >= seq_len) | (n_b == 0):
        return
    kvh = h // G
    r = tl.arange(0, N_PAD)
    r_ok = r < n_b
    qpos = seq_len - n_b + r
    q_tok = (q_end - n_b + r).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    qv = tl.load(q_ptr + q_tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                 mask=r_ok[:, None], other=0.0)
    kpos = k0 + tl.arange(0, BLOCK_N)
    k_ok = kpos < seq_len
    page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + kpos // PAGE_SIZE,
                   mask=k_ok, other=0).to(tl.int64)
    k_off = page * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_ks + kvh * stride_kh
    kv = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd, mask=k_ok[None, :],
                 other=0.0)
    if UPCAST:
        qv = qv.to(tl.float32)
        kv = kv.to(tl.float32)
    s = tl.dot(qv, kv, input_precision=DOT_PRECISION) * qk_scale
    ok = r_ok[:, None] & (kpos[None, :] <= qpos[:, None])
    s = tl.where(ok, s, float("-inf"))
    if PASS == 1:
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log2(tl.sum(tl.exp2(s - m_safe[:, None]), 1))
        tl.store(part_ptr + b * stride_pb + h * stride_ph + r * stride_pr + kt * stride_pk, lse,
                 mask=r_ok)
    else:
        row_lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + r, mask=r_ok, other=0.0)
        p = tl.where(ok, tl.exp2(s - row_lse[:, None]), 0.0) / n_b.to(tl.float32)
        tl.store(vert_ptr + b * stride_vb + h * stride_vh + kpos, tl.sum(p, 0), mask=k_ok)
        # Skew: X[r, u] = p[r, u + r - (N_PAD - 1)], so column u of X is one diagonal,
        # offset d = (L - n_b - k0 + N_PAD - 1) - u.
        u = tl.arange(0, W)
        src = u[None, :] + r[:, None] - (N_PAD - 1)
        src_ok = (src >= 0) & (src < BLOCK_N)
        x = tl.gather(p, tl.minimum(tl.maximum(src, 0), BLOCK_N - 1), axis=1)
        diag = tl.sum(tl.where(src_ok, x, 0.0), 0)
        d = (seq_len - n_b - k0 + N_PAD - 1) - u
        tl.atomic_add(slash_ptr + b * stride_sb + h * stride_sh + d, diag,
                      mask=(d >= 0) & (d < seq_len) & (u < BLOCK_N + N_PAD - 1))


def last_q_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    last_q: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical, slash)``, fp32 ``[batch, Hq, meta.max_kv_blocks * meta.block_size]`` each.

    q ``[num_tokens, Hq, D]``; k_cache ``[num_pages, page_size, Hkv, D]`` (any strides). Entries
    at or past ``seq_len`` are 0. See the module docstring for the definitions.
    """
    if last_q < 1:
        raise ValueError(f"last_q must be >= 1, got {last_q}")
    _num_tokens, hq, d = q.shape
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = meta.batch_size
    width = meta.max_kv_blocks * meta.block_size
    block_n = 64
    nkt = cdiv(width, block_n)
    n_pad = max(16, next_power_of_2(last_q))
    dev = q.device
    part = torch.full((batch, hq, n_pad, nkt), float("-inf"), device=dev, dtype=torch.float32)
    vert = torch.zeros(batch, hq, width, device=dev, dtype=torch.float32)
    slash = torch.zeros(batch, hq, width, device=dev, dtype=torch.float32)
    common = dict(
        LAST_Q=last_q, N_PAD=n_pad, G=group, BLOCK_N=block_n,
        W=next_power_of_2(block_n + n_pad - 1), HEAD_DIM=d, PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret_upcast(q.dtype),
        num_warps=4,
    )
    args = lambda lse: (  # noqa: E731
        q, k_cache, block_table, meta.seq_lens, meta.query_start_loc,
        part, lse, vert, slash,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1),
        vert.stride(0), vert.stride(1),
        slash.stride(0), slash.stride(1),
    )
    grid = (hq, nkt, batch)
    _last_q_kernel[grid](*args(part[..., 0]), PASS=1, **common)
    lse = (torch.logsumexp(part * _LN2, dim=-1) / _LN2).contiguous()  # [B, Hq, N_PAD]
    _last_q_kernel[grid](*args(lse), PASS=2, **common)
    return vert, slash

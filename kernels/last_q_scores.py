"""Vertical and slash statistics of the last queries of each chunk (MInference, FlexPrefill).

For each sequence ``b`` and query head ``h``, the last ``n_b = min(last_q, q_len_b)`` queries of
the chunk (positions ``L - n_b + r``) attend causally to all ``L`` keys of the sequence (prefix
pages included). With ``p[r, k]`` their softmax probabilities:

* ``vertical[b, h, k] = mean_r p[r, k]`` (sums to 1 over ``k``);
* ``slash[b, h, d] = mean_r p[r, L - n_b + r - d]``: probability mass on diagonal offset ``d``.

Two passes of one Triton kernel over (query head, key span, sequence) programs; a span is
``TILES`` key tiles of ``BLOCK_N``, each tile a ``[n_pad, D] x [D, BLOCK_N]`` product with the
program's queries kept in registers: pass 1 writes per-span row log-sum-exps (online over the
span's tiles, then combined by ``torch.logsumexp``), pass 2 writes the normalised column sums
(``vertical``) and adds the diagonal sums of each tile into ``slash`` (``tl.gather`` skews the
tile so each diagonal becomes a column; one vector atomic add per tile). No ``[n, L]``
probability matrix is materialised. One tile per program is the default (measured below);
the kernel takes 1.3 ms of the vertical-slash estimator's 1.8 at 112K + 16K on an H100.
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
    part_ptr,  # fp32 [B, Hq, N_PAD, programs per row]: row lse of a span (base 2) (pass 1 out)
    lse_ptr,  # fp32 [B, Hq, N_PAD]: row lse (base 2)                             (pass 2 in)
    vert_ptr, slash_ptr,  # fp32 [B, Hq, width]                                   (pass 2 out)
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
    TILES: tl.constexpr,  # key tiles per program: its span is TILES * BLOCK_N keys
    W: tl.constexpr,  # next_pow2(BLOCK_N + N_PAD - 1)
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    h = tl.program_id(0)  # fastest: the heads of one span run together (its keys from L2)
    span = tl.program_id(1)
    b = tl.program_id(2)
    seq_len, q_begin, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    q_len = seq_len - chunk_start
    q_end = q_begin + q_len
    n_b = tl.minimum(q_len, LAST_Q)
    k_span = span * (TILES * BLOCK_N)
    if (k_span >= seq_len) | (n_b == 0):
        return
    kvh = h // G
    r = tl.arange(0, N_PAD)
    r_ok = r < n_b
    qpos = seq_len - n_b + r
    q_tok = (q_end - n_b + r).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    # the program's queries stay in registers over its key tiles
    qv = tl.load(q_ptr + q_tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                 mask=r_ok[:, None], other=0.0)
    if UPCAST:
        qv = qv.to(tl.float32)
    n_tiles = tl.minimum(TILES, tl.cdiv(seq_len - k_span, BLOCK_N))
    if PASS == 1:
        m_i = tl.full([N_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([N_PAD], tl.float32)
    else:
        row_lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + r, mask=r_ok, other=0.0)
        inv_n = 1.0 / n_b.to(tl.float32)
    for t in range(0, n_tiles):
        k0 = k_span + t * BLOCK_N
        kpos = k0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < seq_len
        page = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + kpos // PAGE_SIZE,
                       mask=k_ok, other=0).to(tl.int64)
        k_off = page * stride_kp + (kpos % PAGE_SIZE).to(tl.int64) * stride_ks + kvh * stride_kh
        kv = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd, mask=k_ok[None, :],
                     other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
        s = tl.dot(qv, kv, input_precision=DOT_PRECISION) * qk_scale
        ok = r_ok[:, None] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        if PASS == 1:  # online log-sum-exp over the span's tiles
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        else:
            p = tl.where(ok, tl.exp2(s - row_lse[:, None]), 0.0) * inv_n
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
    if PASS == 1:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(l_i > 0, m_safe + tl.log2(l_i), float("-inf"))
        tl.store(part_ptr + b * stride_pb + h * stride_ph + r * stride_pr + span * stride_pk,
                 lse, mask=r_ok)


# Launch settings, measured on an H100 (session 22, benchmarks/bench_last_q.py, a 16K-token
# chunk after 32K / 112K of prefix: benchmarks/results/last_q_2026-11-24_h100_session22/): one
# key tile per program without software pipelining, 0.512 / 1.292 ms per call, against 0.550 /
# 1.370 for the kernel before spans existed and 0.57-0.67 / 1.41-1.72 for spans of 4 or 16 tiles
# at 1, 2 or 3 stages. The kernel is bound by its per-tile math (exp2, the skew, the atomics),
# not by reloading its queries, so longer spans only cut the programs that hide latency.
DEFAULT_TILES = 1
DEFAULT_NUM_STAGES = 1


def last_q_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    last_q: int,
    scale: float | None = None,
    tiles: int = DEFAULT_TILES,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical, slash)``, fp32 ``[batch, Hq, meta.max_kv_blocks * meta.block_size]`` each.

    q ``[num_tokens, Hq, D]``; k_cache ``[num_pages, page_size, Hkv, D]`` (any strides). Entries
    at or past ``seq_len`` are 0. See the module docstring for the definitions. ``tiles``: key
    tiles of 64 per program; ``num_stages``: Triton's software pipelining (defaults measured,
    above).
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
    if tiles < 1 or num_stages < 1:
        raise ValueError(f"tiles and num_stages must be >= 1, got {tiles}, {num_stages}")
    spans = cdiv(nkt, tiles)
    n_pad = max(16, next_power_of_2(last_q))
    dev = q.device
    part = torch.full((batch, hq, n_pad, spans), float("-inf"), device=dev, dtype=torch.float32)
    vert = torch.zeros(batch, hq, width, device=dev, dtype=torch.float32)
    slash = torch.zeros(batch, hq, width, device=dev, dtype=torch.float32)
    common = dict(
        LAST_Q=last_q, N_PAD=n_pad, G=group, BLOCK_N=block_n, TILES=tiles,
        W=next_power_of_2(block_n + n_pad - 1), HEAD_DIM=d, PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret_upcast(q.dtype),
        num_warps=4, num_stages=num_stages,
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
    grid = (hq, spans, batch)
    _last_q_kernel[grid](*args(part[..., 0]), PASS=1, **common)
    lse = (torch.logsumexp(part * _LN2, dim=-1) / _LN2).contiguous()  # [B, Hq, N_PAD]
    _last_q_kernel[grid](*args(lse), PASS=2, **common)
    return vert, slash

"""Vertical and slash statistics of the last queries of each chunk (MInference, FlexPrefill).

For each sequence ``b`` and query head ``h``, the last ``n_b = min(last_q, q_len_b)`` queries of
the chunk (positions ``L - n_b + r``) attend causally to all ``L`` keys of the sequence (prefix
pages included). With ``p[r, k]`` their softmax probabilities:

* ``vertical[b, h, k] = mean_r p[r, k]`` (sums to 1 over ``k``);
* ``slash[b, h, d] = mean_r p[r, L - n_b + r - d]``: probability mass on diagonal offset ``d``.

Two passes of one Triton kernel over (head group, key span, sequence) programs. A program
takes ``HPP`` query heads of one GQA group (``HPP x N_PAD`` query rows share each key tile it
loads) and a span of ``TILES`` key tiles of ``BLOCK_N``; each tile is one
``[HPP * N_PAD, D] x [D, BLOCK_N]`` product. Pass 1 writes per-span row log-sum-exps (online
over the span's tiles, combined by ``_lse_combine_kernel``); pass 2 writes the normalised column
sums (``vertical``) and the diagonal sums (``slash``). No ``[n, L]`` probability matrix is
materialised.

Diagonal sums without atomics: pass 2 rotates row ``r`` of a tile left by ``r`` (a cyclic
``tl.gather`` within the tile's ``BLOCK_N`` columns), so column ``u`` holds, for each row, the
element ``(u + r) mod BLOCK_N``; rows that wrapped ``w`` times lie on diagonal offset
``L - n_b - k0 + w * BLOCK_N - u``, the rest of their class on the same one. Class ``w`` of key
tile ``t`` covers the offsets of class 0 of tile ``t - w`` and of no other tile, so each class
has its own output plane and every element is written by exactly one program (plain stores,
summed over the planes at the end, into the plane beside the vertical sums).
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

__all__ = ["last_q_scores", "last_q_score_planes", "last_q_launch"]


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=[
        "stride_bt", "stride_pb", "stride_ph", "stride_pr", "stride_lb", "stride_lh",
        "stride_vb", "stride_vh", "stride_sw", "stride_sb", "stride_sh",
    ],
    do_not_specialize_on_alignment=[
        "block_table_ptr", "seq_lens_ptr", "qsl_ptr",
    ],
)
def _last_q_kernel(
    q_ptr, k_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_ptr,  # fp32 [B, Hq, N_PAD, programs per row]: row lse of a span (base 2) (pass 1 out)
    lse_ptr,  # fp32 [B, Hq, N_PAD]: row lse (base 2)                             (pass 2 in)
    vert_ptr,  # fp32 [B, Hq, width]                                              (pass 2 out)
    slash_ptr,  # fp32 [NW, B, Hq, width]: diagonal sums per wrap class           (pass 2 out)
    kbar_ptr,  # fp32 [B, Hkv, key tiles, D]: mean key of each tile        (pass 1 out, KBAR)
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_bt,
    stride_pb, stride_ph, stride_pr, stride_pk,
    stride_lb, stride_lh,
    stride_vb, stride_vh,
    stride_sw, stride_sb, stride_sh,
    stride_mb, stride_mh, stride_mj,
    LAST_Q: tl.constexpr,
    N_PAD: tl.constexpr,
    G: tl.constexpr,
    HPP: tl.constexpr,  # query heads per program (of one GQA group), a power of 2
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,  # key tiles per program: its span is TILES * BLOCK_N keys
    NW: tl.constexpr,  # wrap classes of the cyclic skew: (BLOCK_N + N_PAD - 2) // BLOCK_N + 1
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PASS: tl.constexpr,
    KBAR: tl.constexpr,  # pass 1 also writes each key tile's mean (FlexPrefill's block keys)
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    hg = tl.program_id(0)  # fastest: the head groups of one span run together (keys from L2)
    span = tl.program_id(1)
    b = tl.program_id(2)
    seq_len, q_begin, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    q_len = seq_len - chunk_start
    q_end = q_begin + q_len
    n_b = tl.minimum(q_len, LAST_Q)
    k_span = span * (TILES * BLOCK_N)
    if (k_span >= seq_len) | (n_b == 0):
        return
    groups_per_kv: tl.constexpr = (G + HPP - 1) // HPP
    kvh = hg // groups_per_kv
    g0 = (hg % groups_per_kv) * HPP
    rows = tl.arange(0, HPP * N_PAD)
    r = rows % N_PAD
    g_ok = (g0 + rows // N_PAD) < G
    head = kvh * G + g0 + rows // N_PAD
    r_ok = (r < n_b) & g_ok
    qpos = seq_len - n_b + r
    q_tok = (q_end - n_b + r).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    qv = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh
                 + offs_d[None, :] * stride_qd, mask=r_ok[:, None], other=0.0)
    if UPCAST:
        qv = qv.to(tl.float32)
    n_tiles = tl.minimum(TILES, tl.cdiv(seq_len - k_span, BLOCK_N))
    if PASS == 1:
        m_i = tl.full([HPP * N_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HPP * N_PAD], tl.float32)
    else:
        row_lse = tl.load(lse_ptr + b * stride_lb + head * stride_lh + r, mask=r_ok, other=0.0)
        inv_n = 1.0 / n_b.to(tl.float32)
        # per head of the program: [HPP] and the cyclic skew of a tile, [N_PAD, BLOCK_N]
        gh = tl.arange(0, HPP)
        head_h = kvh * G + g0 + gh
        h_ok = (g0 + gh) < G
        u = tl.arange(0, BLOCK_N)
        rot = u[None, :] + r[:, None]  # row r's column u holds tile column (u + r) mod BLOCK_N
        src = rot % BLOCK_N
        wrap = tl.reshape(rot // BLOCK_N, (HPP, N_PAD, BLOCK_N))
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
            if KBAR:
                if g0 == 0:  # one program per KV head writes the tile's mean key
                    n_keys = tl.minimum(seq_len - k0, BLOCK_N).to(tl.float32)
                    tl.store(kbar_ptr + b.to(tl.int64) * stride_mb + kvh * stride_mh
                             + (k0 // BLOCK_N) * stride_mj + offs_d,
                             tl.sum(kv.to(tl.float32), 1) / n_keys)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        else:
            p = tl.where(ok, tl.exp2(s - row_lse[:, None]), 0.0) * inv_n
            p3 = tl.reshape(p, (HPP, N_PAD, BLOCK_N))
            tl.store(vert_ptr + b * stride_vb + head_h[:, None] * stride_vh + kpos[None, :],
                     tl.sum(p3, 1), mask=h_ok[:, None] & k_ok[None, :])
            x = tl.reshape(tl.gather(p, src, axis=1), (HPP, N_PAD, BLOCK_N))
            for w in tl.static_range(NW):
                diag = tl.sum(tl.where(wrap == w, x, 0.0), 1)  # [HPP, BLOCK_N]
                d = seq_len - n_b - k0 + w * BLOCK_N - u
                tl.store(slash_ptr + w * stride_sw + b * stride_sb
                         + head_h[:, None] * stride_sh + d[None, :], diag,
                         mask=h_ok[:, None] & ((d >= 0) & (d < seq_len))[None, :])
    if PASS == 1:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(l_i > 0, m_safe + tl.log2(l_i), float("-inf"))
        tl.store(part_ptr + b * stride_pb + head * stride_ph + r * stride_pr + span * stride_pk,
                 lse, mask=r_ok)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["stride_pb", "stride_ph", "stride_pr", "stride_lb", "stride_lh"],
    do_not_specialize_on_alignment=["seq_lens_ptr", "qsl_ptr"],
)
def _lse_combine_kernel(
    part_ptr,  # fp32 [B, Hq, N_PAD, spans]: pass 1's row log-sum-exp of each span (base 2)
    lse_ptr,  # fp32 [B, Hq, N_PAD]: the rows' log-sum-exp over all spans (base 2)
    seq_lens_ptr, qsl_ptr,
    stride_pb, stride_ph, stride_pr,
    stride_lb, stride_lh,
    LAST_Q: tl.constexpr,
    SPAN_KEYS: tl.constexpr,  # keys per span of pass 1
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Reads only what pass 1 wrote: the spans inside the sequence, of its last queries."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len, _, chunk_start = chunk_of_sequence(b, seq_lens_ptr, qsl_ptr)
    n_b = tl.minimum(seq_len - chunk_start, LAST_Q)
    n_spans = tl.cdiv(seq_len, SPAN_KEYS)
    r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    r_ok = r < n_b
    row = part_ptr + b.to(tl.int64) * stride_pb + h * stride_ph + r.to(tl.int64) * stride_pr
    m = tl.full([ROWS], float("-inf"), tl.float32)
    acc = tl.zeros([ROWS], tl.float32)
    for s0 in range(0, n_spans, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        x = tl.load(row[:, None] + sp[None, :], mask=r_ok[:, None] & (sp < n_spans)[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(acc > 0, m_safe + tl.log2(acc), 0.0)  # rows past n_b: unused by pass 2
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + r, lse)  # the grid covers N_PAD rows


_COMBINE_ROWS = 4  # rows per program of the combine; spans in steps of 512


# Launch settings, measured on an H100 with benchmarks/bench_last_q.py. Session 22 (the kernel
# before head groups and the cyclic skew; benchmarks/results/last_q_2026-11-24_h100_session22/):
# one key tile per program without software pipelining was fastest, 6-7% ahead of the previous
# launch; spans of 4 or 16 tiles were slower. Session 23 (this kernel;
# benchmarks/results/last_q_2026-11-25_h100_session23/): 1.227 ms per call against 1.286 for
# session 22's at 112K + 16K (last_q 64), 2.04 against 2.44 at last_q 128; one head per
# program, 64-key tiles and 4 warps stay the fastest (2 or 4 heads: 1.25-1.38 ms).
DEFAULT_TILES = 1
DEFAULT_NUM_STAGES = 1
DEFAULT_BLOCK_N = 64
# query rows per program that set the default head-group size: HPP = ROWS_PER_PROGRAM // N_PAD
# (at least 1, at most the GQA group; so 1 head from 64 last queries on, the measured cases);
# num_warps 4 up to 128 rows, 8 above
DEFAULT_ROWS_PER_PROGRAM = 64


def last_q_launch(last_q: int, group: int, *, heads_per_program: int | None = None,
                  num_warps: int | None = None) -> tuple[int, int, int]:
    """``(n_pad, heads_per_program, num_warps)`` of a ``last_q_scores`` launch."""
    n_pad = max(16, next_power_of_2(last_q))
    if heads_per_program is None:
        heads_per_program = min(next_power_of_2(group), max(1, DEFAULT_ROWS_PER_PROGRAM // n_pad))
    if heads_per_program < 1 or heads_per_program & (heads_per_program - 1):
        raise ValueError(f"heads_per_program must be a power of 2, got {heads_per_program}")
    if num_warps is None:
        num_warps = 4 if heads_per_program * n_pad <= 128 else 8
    return n_pad, heads_per_program, num_warps


def last_q_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    last_q: int,
    scale: float | None = None,
    **launch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertical, slash)``, fp32 ``[batch, Hq, meta.max_kv_blocks * meta.block_size]`` each.

    q ``[num_tokens, Hq, D]``; k_cache ``[num_pages, page_size, Hkv, D]`` (any strides). Entries
    at or past ``seq_len`` are 0. See the module docstring for the definitions, and
    :func:`last_q_score_planes` (the two as planes of one tensor) for the launch settings.
    """
    planes = last_q_score_planes(q, k_cache, block_table, meta, last_q=last_q, scale=scale,
                                 **launch)
    return planes[0], planes[1]


def last_q_score_planes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    meta: PrefillBlockMeta,
    *,
    last_q: int,
    scale: float | None = None,
    tiles: int = DEFAULT_TILES,
    num_stages: int = DEFAULT_NUM_STAGES,
    block_n: int = DEFAULT_BLOCK_N,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    block_mean_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``[2, batch, Hq, width]``: ``last_q_scores``' vertical (plane 0) and slash (plane 1).

    ``block_mean_keys``: an fp32 ``[batch, Hkv, max_kv_blocks, D]`` tensor that pass 1 fills
    with the mean key of every key block it reads (the key tiles must be the blocks:
    ``block_n == meta.block_size``) -- blocks of sequences without queries are left as they
    are. FlexPrefill's block-mean keys come at no extra read of the cache this way.

    Five launches (the zeroed planes, two passes, the row log-sum-exp combine, the sum of the
    slash's wrap classes). Launch settings (defaults measured, above): ``tiles`` key tiles of
    ``block_n`` per program, ``num_stages`` software pipelining, ``heads_per_program`` query
    heads of one GQA group per program (default from ``DEFAULT_ROWS_PER_PROGRAM``),
    ``num_warps``.
    """
    if last_q < 1:
        raise ValueError(f"last_q must be >= 1, got {last_q}")
    if tiles < 1 or num_stages < 1:
        raise ValueError(f"tiles and num_stages must be >= 1, got {tiles}, {num_stages}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of 2 >= 16, got {block_n}")
    if block_mean_keys is not None and block_n != meta.block_size:
        raise ValueError(f"block mean keys need key tiles of one block: block_n {block_n}, "
                         f"block_size {meta.block_size}")
    _num_tokens, hq, d = q.shape
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    n_pad, hpp, warps = last_q_launch(last_q, group, heads_per_program=heads_per_program,
                                      num_warps=num_warps)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = meta.batch_size
    width = meta.max_kv_blocks * meta.block_size
    spans = cdiv(cdiv(width, block_n), tiles)
    nw = (block_n + n_pad - 2) // block_n + 1
    dev = q.device
    # pass 1 writes the spans inside each sequence for its last queries: the combine reads
    # no other entry
    part = torch.empty(batch, hq, n_pad, spans, device=dev, dtype=torch.float32)
    # plane 0: vertical; planes 1..nw: the wrap classes' diagonal sums (summed into plane 1)
    planes = torch.zeros(1 + nw, batch, hq, width, device=dev, dtype=torch.float32)
    vert, slash = planes[0], planes[1:]
    common = dict(
        LAST_Q=last_q, N_PAD=n_pad, G=group, HPP=hpp, BLOCK_N=block_n, TILES=tiles, NW=nw,
        HEAD_DIM=d, PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpret_upcast(q.dtype),
        num_warps=warps, num_stages=num_stages,
    )
    kbar = part if block_mean_keys is None else block_mean_keys  # not written unless KBAR
    args = lambda lse: (  # noqa: E731
        q, k_cache, block_table, meta.seq_lens, meta.query_start_loc,
        part, lse, vert, slash, kbar,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        lse.stride(0), lse.stride(1),
        vert.stride(0), vert.stride(1),
        slash.stride(0), slash.stride(1), slash.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
    )
    grid = (hkv * cdiv(group, hpp), spans, batch)
    _last_q_kernel[grid](*args(part[..., 0]), PASS=1, KBAR=block_mean_keys is not None,
                         **common)
    lse = torch.empty(batch, hq, n_pad, device=dev, dtype=torch.float32)
    _lse_combine_kernel[(batch, hq, cdiv(n_pad, _COMBINE_ROWS))](
        part, lse, meta.seq_lens, meta.query_start_loc,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        LAST_Q=last_q, SPAN_KEYS=tiles * block_n, ROWS=min(_COMBINE_ROWS, n_pad),
        BLOCK_S=512, num_warps=4,
    )
    _last_q_kernel[grid](*args(lse), PASS=2, KBAR=False, **common)
    for w in range(2, 1 + nw):  # nw >= 2: N_PAD >= 16 rows always wrap into a second class
        planes[1].add_(planes[w])
    return planes[:2]

"""Cover counts of long rows: how many of a row's largest entries stay within a mass ``gamma``.

For each row ``x[p, r, :length]`` of non-negative fp32 (``length = lengths[r //
rows_per_length]``), sorted descending into ``s_1 >= s_2 >= ...`` with prefix sums ``S_k``:
``K = max {k : S_k <= gamma}`` (``K = length`` when the whole row's mass is ``<= gamma``), and
FlexPrefill's block budget ``n = min(max((K + 1) // block_size + 1, 1), ceil(length /
block_size))`` (:func:`cover_counts_reference` is the torch version: sort and cumulative sum).

No sort: the ``(K + 1)``-th largest value ``v`` is the largest value whose entries at or above it
carry more than ``gamma``, found digit by digit from the top bit as in ``radix_select`` but with
histograms of mass beside the counts. Each level is two launches:

* ``_mass_hist_kernel``, one program per (chunk of entries, row, problem): per bin of the
  current digit, the count and the summed value of the chunk's entries whose higher digits equal
  the ones chosen so far (from the second level, a chunk with no entry in the previous level's
  chosen bin writes zeros without reading its entries);
* ``_mass_resolve_kernel``, one program per (row, problem): the chunks' histograms summed; the
  largest bin whose mass at or above it, plus the mass above the prefix, exceeds ``gamma``; the
  count and mass above that bin carried to the next level. After the last level ``v`` is exact
  and ``K = C + min(floor((gamma - M) / v), ties - 1)`` with ``C``, ``M`` the count and mass of
  the entries above ``v``.

Mass sums are fp32 in an order unlike a sequential cumulative sum, so where ``gamma`` falls within
a rounding error of some ``S_k`` the count may differ from the reference by one entry (the tests
use dyadic values, whose sums are exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv
from sparse_kernels.radix_select import _levels, _radix_keys

__all__ = ["cover_counts", "cover_counts_reference"]

DEFAULT_CHUNK = 2048
DEFAULT_DIGIT_BITS = 4  # the mass histogram costs ~bins per entry (a one-hot sum)
_SUB_ELEMENTS = 2048  # entries x bins per one-hot tile


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["rows_per_length", "stride_xp", "stride_xr", "stride_hp", "stride_hr",
                       "stride_hc", "stride_sp", "stride_sr"],
    do_not_specialize_on_alignment=["lengths_ptr"],
)
def _mass_hist_kernel(
    x_ptr, lengths_ptr, state_ptr, cnt_ptr, mass_ptr,
    rows_per_length,
    stride_xp, stride_xr,
    stride_hp, stride_hr, stride_hc,  # cnt and mass share strides
    stride_sp, stride_sr,
    SHIFT: tl.constexpr,
    NBITS: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    FIRST: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    p = tl.program_id(2)
    length = tl.load(lengths_ptr + r // rows_per_length)
    if c * CHUNK >= length:  # the resolve reads only the chunks inside the row
        return
    st = state_ptr + p * stride_sp + r * stride_sr
    prefix = tl.load(st)
    done = tl.load(st + 3)
    h_off = p * stride_hp + r * stride_hr + c * stride_hc
    bins = tl.arange(0, BINS)
    skip = done != 0  # the row's mass is within gamma: nothing to resolve
    if not FIRST:  # a chunk without entries in the previous level's chosen bin has none now
        n_prev = tl.load(cnt_ptr + h_off + ((prefix >> (SHIFT + NBITS)) & (BINS - 1)))
        skip = skip | (n_prev == 0)
    if skip:
        tl.store(cnt_ptr + h_off + bins, tl.zeros([BINS], dtype=tl.int32))
        tl.store(mass_ptr + h_off + bins, tl.zeros([BINS], dtype=tl.float32))
        return
    x_row = x_ptr + p * stride_xp + r.to(tl.int64) * stride_xr
    # per (entry slot, bin) accumulators, reduced once after the loop: a reduction per
    # sub-block (cross-warp, with barriers) made the loop latency-bound
    cnt2 = tl.zeros([SUB, BINS], dtype=tl.int32)
    mass2 = tl.zeros([SUB, BINS], dtype=tl.float32)
    for s in range(0, tl.minimum(CHUNK, length - c * CHUNK), SUB):
        idx = c * CHUNK + s + tl.arange(0, SUB)
        key, ok = _radix_keys(x_row, idx, length)
        ok = ok & ((key >> (SHIFT + NBITS)) == (prefix >> (SHIFT + NBITS)))
        digit = (key >> SHIFT) & ((1 << NBITS) - 1)
        hit = (digit[:, None] == bins[None, :]) & ok[:, None]
        val = key.to(tl.float32, bitcast=True)
        cnt2 += hit.to(tl.int32)
        mass2 += tl.where(hit, val[:, None], 0.0)
    cnt = tl.sum(cnt2, 0)
    mass = tl.sum(mass2, 0)
    tl.store(cnt_ptr + h_off + bins, cnt)
    tl.store(mass_ptr + h_off + bins, mass)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["gamma", "rows_per_length", "stride_hp", "stride_hr", "stride_hc",
                       "stride_sp", "stride_sr", "stride_op"],
    do_not_specialize_on_alignment=["lengths_ptr"],
)
def _mass_resolve_kernel(
    lengths_ptr, state_ptr, cnt_ptr, mass_ptr, out_ptr,
    gamma, rows_per_length,
    stride_hp, stride_hr, stride_hc,
    stride_sp, stride_sr,
    stride_op,
    SHIFT: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
):
    r = tl.program_id(0)
    p = tl.program_id(1)
    length = tl.load(lengths_ptr + r // rows_per_length)
    st = state_ptr + p * stride_sp + r * stride_sr
    if FIRST:
        prefix = length * 0
        c_above = length * 0
        m_above = length.to(tl.float32) * 0.0
        done = length * 0
    else:
        prefix = tl.load(st)
        c_above = tl.load(st + 1)
        m_above = tl.load(st + 2).to(tl.float32, bitcast=True)
        done = tl.load(st + 3)
    k_cov = length  # the whole row when its mass is within gamma
    if done == 0:
        bins = tl.arange(0, BINS)
        acc_c = tl.zeros([BINS], dtype=tl.int32)
        acc_m = tl.zeros([BINS], dtype=tl.float32)
        h_row = p * stride_hp + r * stride_hr
        for c in range(0, tl.cdiv(length, CHUNK)):
            acc_c += tl.load(cnt_ptr + h_row + c * stride_hc + bins)
            acc_m += tl.load(mass_ptr + h_row + c * stride_hc + bins)
        at_least = m_above + (tl.sum(acc_m, 0) - tl.cumsum(acc_m, 0) + acc_m)
        d = tl.max(tl.where(at_least > gamma, bins, -1), 0)
        if FIRST:
            done = (d < 0).to(tl.int32)  # the whole row's mass is within gamma
        else:
            # the bin chosen one level up held more than gamma: a lower total here is rounding
            lowest = tl.min(tl.where(acc_c > 0, bins, BINS), 0)
            d = tl.where(d < 0, lowest, d)
        d = tl.maximum(d, 0)
        c_above += tl.sum(tl.where(bins > d, acc_c, 0), 0)
        m_above += tl.sum(tl.where(bins > d, acc_m, 0.0), 0)
        prefix = prefix | (d << SHIFT)
        ties = tl.sum(tl.where(bins == d, acc_c, 0), 0)
        tl.store(st, prefix)
        tl.store(st + 1, c_above)
        tl.store(st + 2, m_above.to(tl.int32, bitcast=True))
        tl.store(st + 3, done)
        if LAST:
            v = prefix.to(tl.float32, bitcast=True)
            take = tl.floor((gamma - m_above) / v).to(tl.int32)
            k_cov = tl.where(done != 0, length,
                             c_above + tl.minimum(tl.maximum(take, 0), ties - 1))
    if LAST:
        n_blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
        n = tl.minimum(tl.maximum((k_cov + 1) // BLOCK_SIZE + 1, 1), n_blocks)
        tl.store(out_ptr + p * stride_op + r, n)


def cover_counts(
    x: torch.Tensor,
    lengths: torch.Tensor,
    rows_per_length: int,
    gamma: float,
    block_size: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    digit_bits: int = DEFAULT_DIGIT_BITS,
) -> torch.Tensor:
    """int32 ``[P, R]``: FlexPrefill's block budget of every row (see the module docstring).

    x fp32 ``[P, R, W]``, non-negative, last dim contiguous; row ``r`` holds
    ``lengths[r // rows_per_length] <= W`` entries. ``0 < gamma``; ``2 * levels`` launches.
    """
    if x.dtype != torch.float32 or x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError("x must be fp32 [P, R, W] with a contiguous last dim")
    if not gamma > 0.0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of 2 >= 16, got {chunk}")
    if not 1 <= digit_bits <= 8:
        raise ValueError(f"digit_bits must be in 1..8, got {digit_bits}")
    n_p, n_r, width = x.shape
    bins = 1 << digit_bits
    sub = max(16, min(chunk, _SUB_ELEMENTS // bins))
    n_chunks = max(1, cdiv(width, chunk))
    state = torch.zeros(n_p, n_r, 4, device=x.device, dtype=torch.int32)
    cnt = torch.empty(n_p, n_r, n_chunks, bins, device=x.device, dtype=torch.int32)
    mass = torch.empty(n_p, n_r, n_chunks, bins, device=x.device, dtype=torch.float32)
    out = torch.empty(n_p, n_r, device=x.device, dtype=torch.int32)
    if n_r == 0:
        return out
    levels = _levels(digit_bits)
    for i, (shift, nbits) in enumerate(levels):
        first, last = i == 0, i == len(levels) - 1
        _mass_hist_kernel[(n_chunks, n_r, n_p)](
            x, lengths, state, cnt, mass,
            rows_per_length,
            x.stride(0), x.stride(1),
            cnt.stride(0), cnt.stride(1), cnt.stride(2),
            state.stride(0), state.stride(1),
            SHIFT=shift, NBITS=nbits, BINS=bins, CHUNK=chunk, SUB=sub, FIRST=first,
            num_warps=4,
        )
        _mass_resolve_kernel[(n_r, n_p)](
            lengths, state, cnt, mass, out,
            float(gamma), rows_per_length,
            cnt.stride(0), cnt.stride(1), cnt.stride(2),
            state.stride(0), state.stride(1),
            out.stride(0),
            SHIFT=shift, BINS=bins, CHUNK=chunk, BLOCK_SIZE=block_size, FIRST=first,
            LAST=last,
            num_warps=4,
        )
    return out


def cover_counts_reference(x: torch.Tensor, lengths: torch.Tensor, rows_per_length: int,
                           gamma: float, block_size: int) -> torch.Tensor:
    """int32 ``[P, R]``: :func:`cover_counts` by a sort and a cumulative sum (torch)."""
    n_p, n_r, width = x.shape
    ln = lengths.long().repeat_interleave(rows_per_length)[:n_r].to(x.device)
    valid = torch.arange(width, device=x.device)[None, :] < ln[:, None]
    srt = torch.sort(torch.where(valid[None], x, 0.0), dim=-1, descending=True).values
    k_cov = (torch.cumsum(srt, -1) <= gamma).sum(-1)
    k_cov = torch.minimum(k_cov, ln[None, :])  # zeros past the row do not count
    n_blocks = (ln + block_size - 1) // block_size
    n = torch.clamp((k_cov + 1) // block_size + 1, min=1)
    return torch.minimum(n, n_blocks[None, :]).to(torch.int32)

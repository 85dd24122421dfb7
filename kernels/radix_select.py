"""Top-k of long rows by a radix select spread over many programs (no sort, no host sync).

Rows ``x[p, r, :]`` (fp32) of ``P <= 2`` problems that share their rows' valid lengths: the
candidates of row ``r`` are its entries ``x >= 0`` at indices below
``lengths[r // rows_per_length]``; problem ``p`` keeps ``min(k_p, candidates)`` of them, the
largest, ties broken towards the lowest index (``torch.sort(..., stable=True)``'s order; the
reference is :func:`topk_keep_reference`).

Non-negative floats order as their int32 bit patterns, so the k-th largest value is found digit
by digit from the top bit, ``digit_bits`` at a time (31 bits: 4 levels of 8 by default). Each
level is two launches:

* ``_radix_hist_kernel``, one program per (chunk of ``chunk`` entries, row, problem): the
  histogram of the current digit over its candidates whose higher digits equal the ones chosen
  so far (``tl.histogram``), stored per chunk;
* ``_radix_resolve_kernel``, one program per (row, problem): the chunks' histograms summed; the
  digit where the count of entries at or above it first reaches the number still needed; the
  count of entries above it taken off.

After the last level the cut is exact: ``cut`` (the k-th largest value's bits), ``take_eq``
(how many entries equal to it are kept) and ``all_eq`` (how many there are). From the second
level on, a chunk without entries in the previous level's chosen bin skips its histogram. The last level's per-chunk histograms count the entries
equal to ``cut`` in every chunk, which gives each chunk its ties before it (lowest index first).
A consumer kernel turns this into a keep mask with :func:`radix_chunk_keep` and uses it in place
(the vertical-slash estimator marks block maps); nothing of size ``k`` is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv, next_power_of_2

__all__ = ["RadixCut", "radix_select_cut", "radix_keep", "radix_chunk_keep", "radix_keep_mask",
           "topk_keep_reference"]

DEFAULT_CHUNK = 2048  # H100, 112K + 16K: 112 us of kernels against 121 at 4096 and 143 at 8192
DEFAULT_DIGIT_BITS = 8
_KEY_BITS = 31  # non-negative fp32: the sign bit is 0


@triton.jit
def _radix_keys(x_ptr, idx, length):
    """int32 keys of the entries ``idx`` and whether each is a candidate (in the row, >= 0)."""
    ok = idx < length
    x = tl.load(x_ptr + idx, mask=ok, other=-1.0)
    key = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))  # -0.0 counts as 0.0
    return key, ok & (key >= 0)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["rows_per_length", "stride_xp", "stride_xr", "stride_hp", "stride_hr",
                       "stride_hc", "stride_sp", "stride_sr"],
    do_not_specialize_on_alignment=["lengths_ptr"],
)
def _radix_hist_kernel(
    x_ptr, lengths_ptr, state_ptr, hist_ptr,
    rows_per_length,
    stride_xp, stride_xr,
    stride_hp, stride_hr, stride_hc,
    stride_sp, stride_sr,
    SHIFT: tl.constexpr,  # the digit is bits [SHIFT, SHIFT + NBITS) of the key
    NBITS: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    FIRST: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    p = tl.program_id(2)
    length = tl.load(lengths_ptr + r // rows_per_length)
    if c * CHUNK >= length:  # the resolve reads only the chunks inside the row
        return
    prefix = tl.load(state_ptr + p * stride_sp + r * stride_sr)
    h_out = hist_ptr + p * stride_hp + r * stride_hr + c * stride_hc + tl.arange(0, BINS)
    if not FIRST:  # a chunk without entries in the previous level's chosen bin has none now
        n_prev = tl.load(hist_ptr + p * stride_hp + r * stride_hr + c * stride_hc
                         + ((prefix >> (SHIFT + NBITS)) & (BINS - 1)))
        if n_prev == 0:
            tl.store(h_out, tl.zeros([BINS], dtype=tl.int32))
            return
    idx = c * CHUNK + tl.arange(0, CHUNK)
    key, ok = _radix_keys(x_ptr + p * stride_xp + r.to(tl.int64) * stride_xr, idx, length)
    ok = ok & ((key >> (SHIFT + NBITS)) == (prefix >> (SHIFT + NBITS)))
    digit = (key >> SHIFT) & ((1 << NBITS) - 1)
    tl.store(h_out, tl.histogram(digit, BINS, mask=ok))


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["k0", "k1", "rows_per_length", "stride_hp", "stride_hr", "stride_hc",
                       "stride_sp", "stride_sr", "stride_kp"],
    do_not_specialize_on_alignment=["lengths_ptr", "k_rows_ptr"],
)
def _radix_resolve_kernel(
    lengths_ptr, state_ptr, hist_ptr, k_rows_ptr,
    k0, k1, rows_per_length,
    stride_hp, stride_hr, stride_hc,
    stride_sp, stride_sr,
    stride_kp,
    SHIFT: tl.constexpr,
    BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    FIRST: tl.constexpr,
    K_PER_ROW: tl.constexpr,  # k of row r of problem p at k_rows[p, r] (else k0 / k1)
):
    r = tl.program_id(0)
    p = tl.program_id(1)
    length = tl.load(lengths_ptr + r // rows_per_length)
    bins = tl.arange(0, BINS)
    acc = tl.zeros([BINS], dtype=tl.int32)
    h_row = hist_ptr + p * stride_hp + r * stride_hr
    for c in range(0, tl.cdiv(length, CHUNK)):
        acc += tl.load(h_row + c * stride_hc + bins)
    st = state_ptr + p * stride_sp + r * stride_sr
    if FIRST:
        prefix = length * 0
        if K_PER_ROW:
            k = tl.load(k_rows_ptr + p * stride_kp + r)
        else:
            k = tl.where(p == 0, k0, k1)
        need = tl.minimum(k, tl.sum(acc, 0))
        need = tl.maximum(need, 0)
    else:
        prefix = tl.load(st)
        need = tl.load(st + 1)
    at_least = tl.sum(acc, 0) - tl.cumsum(acc, 0) + acc  # entries whose digit is >= the bin
    d = tl.max(tl.where(at_least >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > d, acc, 0), 0)
    tl.store(st, prefix | (d << SHIFT))
    tl.store(st + 1, need - above)
    tl.store(st + 2, tl.sum(tl.where(bins == d, acc, 0), 0))  # after the last level: all ties


@triton.jit
def radix_keep(x_ptr, idx, length, cut, take_eq, all_eq, eq_before):
    """Keep mask of the entries ``idx`` (ascending, one chunk) of a row whose cut is
    ``(cut, take_eq, all_eq)`` (a state row), ``eq_before`` entries equal to the cut lying in
    earlier chunks (only read when some ties are left out)."""
    key, ok = _radix_keys(x_ptr, idx, length)
    if take_eq == all_eq:  # every tie is kept (the usual case): no ranks
        keep = ok & (key >= cut)
    else:
        eq = (ok & (key == cut)).to(tl.int32)
        rank = eq_before + tl.cumsum(eq, 0) - eq  # ties before this entry, lowest index first
        keep = (ok & (key > cut)) | ((eq > 0) & (rank < take_eq))
    return keep


@triton.jit
def radix_ties_before(hist_row_ptr, stride_hc, c, cut, LAST_NBITS: tl.constexpr,
                      MAX_CHUNKS: tl.constexpr):
    """Entries equal to ``cut`` in chunks ``0..c-1`` of a row (its last level's histograms)."""
    cc = tl.arange(0, MAX_CHUNKS)
    n = tl.load(hist_row_ptr + cc * stride_hc + (cut & ((1 << LAST_NBITS) - 1)), mask=cc < c,
                other=0)
    return tl.sum(n, 0)


@triton.jit
def radix_chunk_keep(x_row_ptr, state_row_ptr, hist_row_ptr, stride_hc, c, length,
                     CHUNK: tl.constexpr, LAST_NBITS: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """``(idx, keep)``: the entries of chunk ``c`` of a row and whether the row's cut (its state
    row ``(cut, take_eq, all_eq)`` and last-level histograms) keeps them. ``c * CHUNK`` must be
    below ``length`` (chunks past the row have no histograms)."""
    cut = tl.load(state_row_ptr)
    take_eq = tl.load(state_row_ptr + 1)
    all_eq = tl.load(state_row_ptr + 2)
    eq_before = radix_ties_before(hist_row_ptr, stride_hc, c, cut, LAST_NBITS, MAX_CHUNKS)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    return idx, radix_keep(x_row_ptr, idx, length, cut, take_eq, all_eq, eq_before)


@triton.jit(
    # not specialized on values that change with batch and lengths: no compile while serving
    do_not_specialize=["rows_per_length", "width", "stride_xp", "stride_xr", "stride_hp",
                       "stride_hr", "stride_hc", "stride_sp", "stride_sr", "stride_op",
                       "stride_or"],
    do_not_specialize_on_alignment=["lengths_ptr"],
)
def _radix_mask_kernel(
    x_ptr, lengths_ptr, state_ptr, hist_ptr, out_ptr,
    rows_per_length, width,
    stride_xp, stride_xr,
    stride_hp, stride_hr, stride_hc,
    stride_sp, stride_sr,
    stride_op, stride_or,
    CHUNK: tl.constexpr,
    LAST_NBITS: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    p = tl.program_id(2)
    length = tl.load(lengths_ptr + r // rows_per_length)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    o_row = out_ptr + p * stride_op + r.to(tl.int64) * stride_or
    if c * CHUNK >= length:  # past the row (its chunks' histograms were not written)
        tl.store(o_row + idx, tl.zeros([CHUNK], dtype=tl.int8), mask=idx < width)
        return
    idx, keep = radix_chunk_keep(x_ptr + p * stride_xp + r.to(tl.int64) * stride_xr,
                                 state_ptr + p * stride_sp + r * stride_sr,
                                 hist_ptr + p * stride_hp + r * stride_hr, stride_hc, c, length,
                                 CHUNK, LAST_NBITS, MAX_CHUNKS)
    tl.store(o_row + idx, keep.to(tl.int8), mask=idx < width)


def radix_keep_mask(x: torch.Tensor, lengths: torch.Tensor, rows_per_length: int,
                    cut: "RadixCut") -> torch.Tensor:
    """int8 ``[P, R, W]``: 1 where :func:`radix_select_cut`'s ``cut`` keeps the entry (one launch)."""
    n_p, n_r, width = x.shape
    out = torch.empty(n_p, n_r, width, device=x.device, dtype=torch.int8)
    if n_r and width:
        _radix_mask_kernel[(cdiv(width, cut.chunk), n_r, n_p)](
            x, lengths, cut.state, cut.hist, out,
            rows_per_length, width,
            x.stride(0), x.stride(1),
            cut.hist.stride(0), cut.hist.stride(1), cut.hist.stride(2),
            cut.state.stride(0), cut.state.stride(1),
            out.stride(0), out.stride(1),
            CHUNK=cut.chunk, LAST_NBITS=cut.last_nbits,
            MAX_CHUNKS=max(2, next_power_of_2(cut.max_chunks)),
            num_warps=4,
        )
    return out


@dataclass(frozen=True)
class RadixCut:
    """Result of :func:`radix_select_cut`: ``state[p, r] = (cut, take_eq, all_eq)`` int32 (the
    k-th largest value's bits, how many entries equal to it are kept, how many there are), and
    the last level's per-chunk histograms ``hist[p, r, c, bin]`` (ties per chunk)."""

    state: torch.Tensor
    hist: torch.Tensor
    chunk: int
    last_nbits: int

    @property
    def max_chunks(self) -> int:
        return self.hist.shape[2]


def _levels(digit_bits: int) -> list[tuple[int, int]]:
    """(shift, nbits) of each level, from the top bit."""
    out, top = [], _KEY_BITS
    while top > 0:
        nbits = min(digit_bits, top)
        out.append((top - nbits, nbits))
        top -= nbits
    return out


def radix_select_cut(
    x: torch.Tensor,
    lengths: torch.Tensor,
    rows_per_length: int,
    k: tuple[int, ...] | torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
    digit_bits: int = DEFAULT_DIGIT_BITS,
) -> RadixCut:
    """The cut of every row's top ``k[p]`` (see the module docstring); ``2 * levels`` launches.

    ``k``: one int per problem, or an int32 device tensor ``[P, R]`` (a k per row, e.g. computed
    on the device). x fp32 ``[P, R, W]`` (last dim contiguous), ``P <= 2``; lengths int32/int64
    ``[>= R / rows_per_length]``: row ``r``'s candidates are ``x[p, r, :lengths[r //
    rows_per_length]]`` that are ``>= 0`` (lengths above ``W`` are not allowed).
    """
    if x.dtype != torch.float32 or x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError("x must be fp32 [P, R, W] with a contiguous last dim")
    n_p, n_r, width = x.shape
    per_row = isinstance(k, torch.Tensor)
    if per_row:
        if k.dtype != torch.int32 or tuple(k.shape) != (n_p, n_r) or k.stride(-1) != 1:
            raise ValueError(f"per-row k must be int32 [P, R] = {(n_p, n_r)}, got "
                             f"{k.dtype} {tuple(k.shape)}")
    elif len(k) != n_p:
        raise ValueError(f"one k per problem, got x {tuple(x.shape)} and k {k}")
    if not 1 <= n_p <= 2:
        raise ValueError(f"1 or 2 problems, got x {tuple(x.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of 2 >= 16, got {chunk}")
    if not 1 <= digit_bits <= 12:
        raise ValueError(f"digit_bits must be in 1..12, got {digit_bits}")
    bins = 1 << digit_bits
    n_chunks = max(1, cdiv(width, chunk))
    state = torch.zeros(n_p, n_r, 3, device=x.device, dtype=torch.int32)
    hist = torch.empty(n_p, n_r, n_chunks, bins, device=x.device, dtype=torch.int32)
    levels = _levels(digit_bits)
    if n_r:
        k0 = 0 if per_row else int(k[0])
        k1 = 0 if per_row else int(k[-1])
        k_rows = k if per_row else state  # not read unless per_row
        for i, (shift, nbits) in enumerate(levels):
            _radix_hist_kernel[(n_chunks, n_r, n_p)](
                x, lengths, state, hist,
                rows_per_length,
                x.stride(0), x.stride(1),
                hist.stride(0), hist.stride(1), hist.stride(2),
                state.stride(0), state.stride(1),
                SHIFT=shift, NBITS=nbits, BINS=bins, CHUNK=chunk, FIRST=i == 0,
                num_warps=4,
            )
            _radix_resolve_kernel[(n_r, n_p)](
                lengths, state, hist, k_rows,
                k0, k1, rows_per_length,
                hist.stride(0), hist.stride(1), hist.stride(2),
                state.stride(0), state.stride(1),
                k_rows.stride(0),
                SHIFT=shift, BINS=bins, CHUNK=chunk, FIRST=i == 0, K_PER_ROW=per_row,
                num_warps=4,
            )
    return RadixCut(state, hist, chunk, levels[-1][1])


def topk_keep_reference(x: torch.Tensor, lengths: torch.Tensor, rows_per_length: int,
                        k: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """bool ``[P, R, W]``: the entries :func:`radix_select_cut` keeps (torch, stable sort)."""
    n_p, n_r, width = x.shape
    ln = lengths.long().repeat_interleave(rows_per_length)[:n_r].to(x.device)
    cand = (torch.arange(width, device=x.device)[None, :] < ln[:, None])[None] & (x >= 0)
    keyed = torch.where(cand, x, -1.0)
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(width, device=x.device).expand_as(order))
    if isinstance(k, torch.Tensor):
        kk = k.to(x.device).long()[:, :, None]
    else:
        kk = torch.tensor(k, device=x.device)[:, None, None]
    return cand & (rank < kk)

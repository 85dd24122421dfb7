"""Selection reuse across decode steps (LServe): which rows keep last step's page selection.

Top-k decode scores every page summary of a row and runs a top-k each step. LServe observed
that the pages a query selects change slowly from one decode step to the next, so a selection
can serve ``R`` consecutive steps: the steps in between skip the scoring and the top-k of that
row (the decode kernel reads the stored selection; the local pages still hold the newest
tokens, see below).

An engine's decode batch is a list of rows with no request ids on the device, and rows move
between steps (requests finish, batches are condensed and reordered). So each row keeps a small
**tag** of the request it last selected for, and a row reuses its stored selection only when
the tag proves it is the same request, on the same last page, fewer than ``R`` tokens later:

* ``block0``: the physical page of the row's logical page 0;
* ``blockl``: the physical page of its last logical page at the selection step;
* ``sel_len``: its length at the selection step (``0``: no valid selection);
* ``start_len``: its length at the first decode step of the request in this row (``0``: none).

A row with ``reuse_after > 0`` keeps a selection only once ``n - start_len >= reuse_after``:
the first tokens a request generates (for a short answer, all of it) select every step.
``start_len`` carries over while the row continues the same decoding request: a decode row
last step too (``sel_len > 0``), the same first page, ``1 <= n - sel_len <= R``; otherwise it
is this step's length. (Two requests sharing a cached first page could pass that test for each
other; that only moves when reuse starts, it never lets a row keep another row's selection,
which the tag above decides.)

Row ``r`` (a decode row of this step, length ``n``) **keeps** its selection iff ``sel_len > 0``,
``block_table[r, 0] == block0``, its last page ``(n - 1) // page_size`` is the last page of the
selection step (``(sel_len - 1) // page_size``), ``block_table[r, last] == blockl``, and
``1 <= n - sel_len < R`` (and it is past its first ``reuse_after`` tokens, below). Same last page means no page appeared since: the stored list still
covers every page the selection step had (the local pages, sink pages and short/dense row
markers are unchanged) and the newest token lands on the last page, which is always selected.
A row that crosses into a new page selects again.

Why a tag cannot match another request's stale selection: the state of every row that is not a
decode row of a step is cleared in that step (so a tag is at most one step old), and the last
page of a request is its own page while it decodes (an engine shares only full, cached pages).
A request in that row one step later with the same physical last page and the same page index
is the same request. The decode kernel reads pages through the current row's block table, so
even a wrong tag could only pick a worse set of the current request's own pages, never another
request's KV.

Every other row (a decode row that does not keep) selects this step and its tag is set to
this step's values. The update is one launch per engine step (shared by all layers), grid over
the state's rows, no host sync; the per-layer selection buffers must persist between steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_kernels.host_math import cdiv
from sparse_kernels.launch import fast_launch

REUSE_BLOCK = 256


@fast_launch
@triton.jit(do_not_specialize=["num_decodes", "reuse_steps", "reuse_after"])
def _reuse_rows_kernel(
    state_ptr,
    keep_ptr,
    seq_lens_ptr,
    block_table_ptr,
    counts_ptr,
    num_rows,
    num_decodes,
    reuse_steps,
    reuse_after,
    stride_state,
    stride_bt,
    PAGE_SIZE: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(num_rows, BLOCK),)``: :func:`update_reuse_rows` for rows of one block."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_state = rows < num_rows
    is_dec = rows < num_decodes
    n = tl.load(seq_lens_ptr + rows, mask=is_dec, other=0)
    live = is_dec & (n > 0)
    last = tl.maximum(n - 1, 0) // PAGE_SIZE
    bt_row = block_table_ptr + rows.to(tl.int64) * stride_bt
    b0 = tl.load(bt_row, mask=live, other=-1)
    bl = tl.load(bt_row + last, mask=live, other=-1)
    t0 = tl.load(state_ptr + rows, mask=in_state, other=-1)
    tl_ = tl.load(state_ptr + stride_state + rows, mask=in_state, other=-1)
    sl = tl.load(state_ptr + 2 * stride_state + rows, mask=in_state, other=0)
    st = tl.load(state_ptr + 3 * stride_state + rows, mask=in_state, other=0)
    step = n - sl
    same_req = live & (sl > 0) & (b0 == t0) & (step >= 1)
    start = tl.where(same_req & (step <= reuse_steps), st, tl.where(live, n, 0))
    keep = (same_req & (bl == tl_) & (step < reuse_steps)
            & ((tl.maximum(sl - 1, 0) // PAGE_SIZE) == last) & (n - start >= reuse_after))
    new_t0 = tl.where(keep, t0, tl.where(live, b0, -1))
    new_tl = tl.where(keep, tl_, tl.where(live, bl, -1))
    new_sl = tl.where(keep, sl, tl.where(live, n, 0))
    tl.store(state_ptr + rows, new_t0, mask=in_state)
    tl.store(state_ptr + stride_state + rows, new_tl, mask=in_state)
    tl.store(state_ptr + 2 * stride_state + rows, new_sl, mask=in_state)
    tl.store(state_ptr + 3 * stride_state + rows, start, mask=in_state)
    tl.store(keep_ptr + rows, keep.to(tl.int32), mask=in_state)
    if COUNT:
        # rows that kept their selection and decode rows of this step, into two fp64 counters
        tl.atomic_add(counts_ptr, tl.sum(keep.to(tl.int32), 0).to(tl.float64))
        tl.atomic_add(counts_ptr + 1, tl.sum(live.to(tl.int32), 0).to(tl.float64))


def new_reuse_state(max_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(state, keep)``: int32 ``[4, max_rows]`` tags (block0, blockl, sel_len, start_len;
    all rows without a selection) and int32 ``[max_rows]`` keep flags, for
    :func:`update_reuse_rows`."""
    state = torch.empty((4, max_rows), dtype=torch.int32, device=device)
    state[:2] = -1
    state[2:] = 0
    return state, torch.zeros(max_rows, dtype=torch.int32, device=device)


def update_reuse_rows(state: torch.Tensor, keep: torch.Tensor, seq_lens: torch.Tensor,
                      block_table: torch.Tensor, num_decodes: int, page_size: int,
                      reuse_steps: int, counts: torch.Tensor | None = None,
                      reuse_after: int = 0) -> torch.Tensor:
    """One engine step: ``keep[r] = 1`` for the decode rows that reuse their stored selection
    (see the module docstring), ``0`` for every other row; tags updated in place.

    Args:
        state: int32 ``[4, max_rows]`` from :func:`new_reuse_state` (persistent across steps).
        keep: int32 ``[max_rows]`` (persistent: CUDA graphs read it), written for every row.
        seq_lens: int32 ``[>= num_decodes]``: this step's lengths (decode rows first).
        block_table: int32 ``[>= num_decodes, max_pages]``.
        num_decodes: rows ``0 .. num_decodes - 1`` are this step's decode rows (one new token
            each, already counted in ``seq_lens``); every other row's state is cleared.
        reuse_steps: ``R``: a selection serves at most ``R`` steps (``R = 1``: never kept).
        counts: optional fp64 ``[2]``: ``+= (rows kept, decode rows)``.
        reuse_after: a request's first this-many generated tokens always select (0: none).
    Returns ``keep``.
    """
    num_rows = state.shape[1]
    assert state.shape[0] == 4 and keep.shape[0] >= num_rows
    assert reuse_after >= 0
    assert num_decodes <= num_rows, (num_decodes, num_rows)
    assert state.is_contiguous() and keep.is_contiguous()
    if num_decodes:
        assert seq_lens.shape[0] >= num_decodes and block_table.shape[0] >= num_decodes
    if counts is not None:
        assert counts.dtype == torch.float64
    _reuse_rows_kernel[(cdiv(num_rows, REUSE_BLOCK),)](
        state, keep, seq_lens, block_table, keep if counts is None else counts,
        num_rows, num_decodes, reuse_steps, reuse_after, state.stride(0), block_table.stride(0),
        PAGE_SIZE=page_size, COUNT=counts is not None, BLOCK=REUSE_BLOCK, num_warps=4)
    return keep


def update_reuse_rows_reference(state: torch.Tensor, seq_lens: torch.Tensor,
                                block_table: torch.Tensor, num_decodes: int, page_size: int,
                                reuse_steps: int, reuse_after: int = 0
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`update_reuse_rows`: ``(new_state, keep)`` (no in-place
    update)."""
    num_rows = state.shape[1]
    dev = state.device
    rows = torch.arange(num_rows, device=dev)
    is_dec = rows < num_decodes
    n = torch.zeros(num_rows, dtype=torch.int64, device=dev)
    n[:num_decodes] = seq_lens[:num_decodes].long()
    live = is_dec & (n > 0)
    last = (n - 1).clamp_min(0) // page_size
    b0 = torch.full((num_rows,), -1, dtype=torch.int64, device=dev)
    bl = b0.clone()
    if num_decodes:
        bt = block_table[:num_decodes].long()
        b0[:num_decodes] = bt[:, 0]
        bl[:num_decodes] = bt.gather(1, last[:num_decodes, None])[:, 0]
    b0 = torch.where(live, b0, -1)
    bl = torch.where(live, bl, -1)
    t0, tl_, sl, st = (state[i].long() for i in range(4))
    step = n - sl
    same_req = live & (sl > 0) & (b0 == t0) & (step >= 1)
    start = torch.where(same_req & (step <= reuse_steps), st, torch.where(live, n, 0))
    keep = (same_req & (bl == tl_) & (step < reuse_steps)
            & ((sl - 1).clamp_min(0) // page_size == last) & (n - start >= reuse_after))
    new = torch.stack([torch.where(keep, t0, b0), torch.where(keep, tl_, bl),
                       torch.where(keep, sl, torch.where(live, n, 0)), start]).to(torch.int32)
    return new, keep.to(torch.int32)


__all__ = ["new_reuse_state", "update_reuse_rows", "update_reuse_rows_reference"]

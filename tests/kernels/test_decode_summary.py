"""Quest page summaries: full build and the incremental per-step update vs the reference."""

import os

import pytest
import torch

from sparse_kernels.page_summary import build_page_summaries, update_page_summaries
from sparse_kernels.reference import random_paged_kv
from sparse_kernels.reference_decode import ref_page_summaries

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
POISON = 1e4  # what a kernel sees if it reads a token it must not


def _i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEVICE)


def _nan_summaries(k):
    n, _, h, d = k.shape
    return torch.full((n, 2, h, d), float("nan"), dtype=k.dtype, device=DEVICE)


def _assert_summaries_equal(got, want):
    # min / max are exact in every dtype: compare bit for bit (NaN = never written).
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "page,layout,dtype,head_dim",
    [
        (16, "NHD", torch.float32, 64),
        (1, "HND", torch.bfloat16, 128),
        (64, "interleaved", torch.bfloat16, 64),
    ],
)
def test_build_matches_reference(page, layout, dtype, head_dim):
    g = torch.Generator().manual_seed(0)
    seq_lens = [3 * page + 5, 1, 2 * page, page - 1 if page > 1 else 7]
    k, v, bt = random_paged_kv(seq_lens, 2, head_dim, page, dtype, layout, generator=g)
    k, bt = k.to(DEVICE), bt.to(DEVICE)
    summ = _nan_summaries(k)
    build_page_summaries(k, summ, bt, _i32(seq_lens))
    want = ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(seq_lens))
    _assert_summaries_equal(summ, want)
    # Partial last pages exclude the poisoned tail (so the max stays far below POISON).
    assert summ.nan_to_num().float().abs().max() < 100


def _poisoned_cache(final_lens, start_lens, page, layout, dtype, head_dim, seed=0):
    """A cache holding the final data, with every token at or after ``start_lens`` poisoned.

    Returns (k, true_k, block_table): writing ``true_k[pos]`` simulates the engine's KV write.
    """
    g = torch.Generator().manual_seed(seed)
    k, _, bt = random_paged_kv(final_lens, 2, head_dim, page, dtype, layout, generator=g)
    true_k = k.clone()
    for b, s in enumerate(start_lens):
        for pos in range(s, final_lens[b]):
            k[bt[b, pos // page].long(), pos % page] = POISON
    return k.to(DEVICE), true_k.to(DEVICE), bt.to(DEVICE)


def _write(k, true_k, bt, b, positions, page):
    for pos in positions:
        phys = bt[b, pos // page].long()
        k[phys, pos % page] = true_k[phys, pos % page]


@pytest.mark.parametrize(
    "page,layout,dtype", [(16, "NHD", torch.float32), (4, "interleaved", torch.bfloat16)]
)
def test_decode_steps_cross_page_boundaries(page, layout, dtype):
    """Several decode steps, one token per sequence each, crossing page boundaries."""
    steps = 5
    start = [page - 2, 2 * page - 1, 3, page]
    final = [s + steps for s in start]
    k, true_k, bt = _poisoned_cache(final, start, page, layout, dtype, 64)
    summ = _nan_summaries(k)
    build_page_summaries(k, summ, bt, _i32(start))
    _assert_summaries_equal(summ, ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(start)))
    batch = len(start)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    for step in range(1, steps + 1):
        lens = [s + step for s in start]
        for b in range(batch):
            _write(k, true_k, bt, b, [lens[b] - 1], page)
        update_page_summaries(k, summ, bt, qsl, _i32(lens), num_tokens=batch)
        want = ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(lens), summ.cpu())
        _assert_summaries_equal(summ, want)
        # and the whole buffer equals a from-scratch build (no stale page anywhere)
        _assert_summaries_equal(summ, ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(lens)))


@pytest.mark.parametrize("page,dtype", [(16, torch.float32), (64, torch.bfloat16)])
def test_mixed_step_prefill_chunk_is_incremental(page, dtype):
    """One step of a mixed batch: a decode token, a non-page-aligned prefill chunk, a first
    chunk, an unscheduled sequence (q_len 0), plus padding tokens at the end of the grid.
    Touched pages must equal the reference; untouched pages must keep their old bytes."""
    old = [page + 4, 10, 0, 2 * page - 2]
    q_lens = [1, 2 * page + 5, page + 7, 0]
    new = [o + q for o, q in zip(old, q_lens)]
    k, true_k, bt = _poisoned_cache(new, old, page, "HND", dtype, 128, seed=1)
    summ = _nan_summaries(k)
    build_page_summaries(k, summ, bt, _i32(old))
    # Mark every page this step does not touch with a sentinel; the update must not rewrite it.
    touched = set()
    for b, (o, n) in enumerate(zip(old, new)):
        touched |= {int(bt[b, p // page]) for p in range(o, n)}
    sentinel = torch.tensor(7.0, dtype=dtype)
    for p in range(summ.shape[0]):
        if p not in touched:
            summ[p] = sentinel
    before = summ.clone()
    for b in range(len(old)):
        _write(k, true_k, bt, b, range(old[b], new[b]), page)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    num_tokens = qsl[-1] + 3  # CUDA-graph padding: tokens past query_start_loc[-1]
    update_page_summaries(k, summ, bt, _i32(qsl), _i32(new), num_tokens=num_tokens)

    want = ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(new))
    for p in range(summ.shape[0]):
        if p in touched:
            _assert_summaries_equal(summ[p], want[p])
        else:
            _assert_summaries_equal(summ[p], before[p])
    assert len(touched) >= 5  # the test exercised several pages per chunk


def test_padded_sequences_write_nothing():
    """seq_len 0 / q_len 0 padding rows (CUDA graphs) leave the buffer untouched."""
    k, _, bt = random_paged_kv([5, 9], 2, 64, 4, generator=torch.Generator().manual_seed(3))
    k, bt = k.to(DEVICE), bt.to(DEVICE)
    summ = _nan_summaries(k)
    update_page_summaries(k, summ, bt, _i32([0, 0, 0]), _i32([0, 0]), num_tokens=4)
    assert torch.isnan(summ).all()
    build_page_summaries(k, summ, bt, _i32([0, 0]))
    assert torch.isnan(summ).all()


@pytest.mark.parametrize("page,dtype,select", [(4, torch.float32, "auto"),
                                               (16, torch.bfloat16, "auto"),
                                               (4, torch.float32, "single"),
                                               (4, torch.float32, "fused")])
def test_decode_attention_fused_summary_steps(page, dtype, select):
    """Decode steps through ``decode_attention(fuse_summary=True)`` with no
    ``update_page_summaries`` call: after each step the whole buffer equals a from-scratch
    build of the cache (a sparse row, a dense row, a short row and one that crosses from
    short to dense, several of them crossing page boundaries), and the output equals the
    reference over the returned selection (dense rows: dense attention)."""
    import math

    from sparse_kernels.config import SparseConfig
    from sparse_kernels.page_select import DENSE_ROW, SelectWorkspace
    from sparse_kernels.pipeline import decode_attention, decode_budget_pages
    from sparse_kernels.reference import dense_attention
    from sparse_kernels.reference_decode import ref_sparse_decode

    cfg = SparseConfig(token_budget=4 * page, sink_tokens=page, local_tokens=page,
                       decode_min_seq_len=8 * page,  # 4 pages selected, dense up to 8 pages
                       decode_select=select)
    steps = 5
    # sparse (crosses a page), dense (crosses a page), short, short -> dense, dense -> sparse
    start = [12 * page - 2, 6 * page - 1, 2 * page, 4 * page - 2, 8 * page - 1]
    final = [s + steps for s in start]
    k, true_k, bt = _poisoned_cache(final, start, page, "interleaved", dtype, 64, seed=4)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    summ = _nan_summaries(k)
    build_page_summaries(k, summ, bt, _i32(start))
    batch, group = len(start), 2
    g = torch.Generator().manual_seed(6)
    num_select = decode_budget_pages(cfg, page)[0]
    ws = SelectWorkspace(batch, 2, bt.shape[1], device=DEVICE, counters=select == "fused")
    saw_dense = set()
    for step in range(1, steps + 1):
        lens = [s + step for s in start]
        for b in range(batch):
            _write(k, true_k, bt, b, [lens[b] - 1], page)
        q = torch.randn(batch, 2 * group, 64, generator=g).to(dtype).to(DEVICE)
        out = torch.empty_like(q)
        sel = decode_attention("topk", cfg, q, k, v, summ, bt, _i32(lens), out,
                               1 / math.sqrt(64), fuse_summary=True, select_workspace=ws)
        _assert_summaries_equal(summ, ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(lens)))
        c = [x.cpu() for x in (q, k, v, bt)] + [torch.tensor(lens, dtype=torch.int32)]
        want = ref_sparse_decode(*c, sel.cpu())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float().cpu(), want, rtol=tol, atol=tol)
        dense = dense_attention(*c[:4], torch.arange(batch + 1, dtype=torch.int32), c[4])
        for b in range(batch):
            n = -(-lens[b] // page)
            is_dense = bool((sel[b, :, 0] == DENSE_ROW).all())
            assert is_dense == (num_select < n <= 8), (step, b, n)
            if is_dense:
                saw_dense.add(b)
                torch.testing.assert_close(out[b].float().cpu(), dense[b].float(), rtol=tol,
                                           atol=tol)
    assert saw_dense == {1, 3, 4}


def test_fused_selection_needs_arrival_counters():
    """method='fused' with a workspace that has no arrival counters is refused on the host
    (the kernel would index past the one-element counter buffer)."""
    from sparse_kernels.page_select import SelectWorkspace, select_pages

    k, _, bt = random_paged_kv([40, 33], 2, 64, 4, generator=torch.Generator().manual_seed(8))
    k, bt = k.to(DEVICE), bt.to(DEVICE)
    summ = _nan_summaries(k)
    build_page_summaries(k, summ, bt, _i32([40, 33]))
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ws = SelectWorkspace(2, 2, bt.shape[1], device=DEVICE, counters=False)
    with pytest.raises(ValueError, match="arrival counters"):
        select_pages(q, summ, bt, _i32([40, 33]), 4, 4, 1, 1, method="fused", workspace=ws)

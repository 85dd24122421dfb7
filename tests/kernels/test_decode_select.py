"""Quest page scoring and top-k selection vs the reference."""

import os

import pytest
import torch

from sparse_kernels import page_select
from sparse_kernels.page_select import (
    DENSE_ROW,
    density,
    pages_read,
    reselect_pages,
    score_pages,
    select_pages,
    tokens_read,
    topk_pages,
)
from sparse_kernels.reference import random_paged_kv
from sparse_kernels.reference_decode import (
    ref_page_scores,
    ref_page_summaries,
    ref_select_from_scores,
    ref_select_pages,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def _setup(seq_lens, group, head_dim, page, dtype=torch.float32, num_kv_heads=2, seed=0):
    """Random cache, exact reference summaries and one decode query per sequence (CPU)."""
    g = torch.Generator().manual_seed(seed)
    k, _, bt = random_paged_kv(seq_lens, num_kv_heads, head_dim, page, dtype, generator=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    summ = ref_page_summaries(k, bt, sl).nan_to_num(0.0)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    return q, summ, bt, sl


def _dev(*xs):
    return [x.to(DEVICE) for x in xs]


@pytest.mark.parametrize(
    "group,head_dim,page,dtype",
    [
        (1, 64, 16, torch.float32),
        (4, 128, 16, torch.bfloat16),
        (7, 64, 1, torch.float32),
        (8, 64, 64, torch.float16),
    ],
)
def test_scores_match_reference(group, head_dim, page, dtype):
    seq_lens = [5 * page + 3, page, 1, 9 * page]
    q, summ, bt, sl = _setup(seq_lens, group, head_dim, page, dtype)
    raw = torch.empty(len(seq_lens), 2, bt.shape[1], device=DEVICE)
    forced = score_pages(*_dev(q, summ, bt, sl), page, sink_pages=1, local_pages=2,
                         raw_scores=raw)
    want = ref_page_scores(q, summ, bt, sl, page)
    torch.testing.assert_close(raw.cpu(), want, rtol=1e-4, atol=1e-3)
    # Forced scores: +inf on the first page and the last two pages of each sequence.
    for b, s in enumerate(seq_lens):
        n = -(-s // page)
        expect_inf = [j < 1 or j >= n - 2 for j in range(n)]
        got_inf = (forced[b, :, :n].cpu() == float("inf"))
        assert got_inf.tolist() == [expect_inf] * 2, (b, got_inf)
        assert (forced[b, :, n:] == float("-inf")).all()


def _check_selection_invariants(sel, seq_lens, page, k, sink, local):
    for b, s in enumerate(seq_lens):
        n = -(-s // page)
        for h in range(sel.shape[1]):
            row = sel[b, h].tolist()
            m = min(k, n)
            valid, pad = row[:m], row[m:]
            assert pad == [-1] * (k - m), row
            assert valid == sorted(set(valid)) and all(0 <= j < n for j in valid), row
            must = {j for j in range(n) if j < sink or j >= n - local}
            assert must <= set(valid), (row, must)


@pytest.mark.parametrize(
    "group,head_dim,page,num_select,sink,local",
    [(4, 64, 16, 8, 1, 2), (7, 128, 1, 24, 4, 8), (8, 64, 64, 4, 1, 1)],
)
def test_select_matches_reference(group, head_dim, page, num_select, sink, local):
    # ragged; one sequence shorter than the budget, one exactly at it, one single token
    seq_lens = [3 * num_select * page + 3, 3 * page - 1, num_select * page, 1,
                (num_select + 3) * page]
    q, summ, bt, sl = _setup(seq_lens, group, head_dim, page, seed=1)
    sel = select_pages(*_dev(q, summ, bt, sl), page, num_select, sink, local).cpu()
    assert sel.dtype == torch.int32 and sel.shape == (len(seq_lens), 2, num_select)
    want = ref_select_pages(q, summ, bt, sl, page, num_select, sink, local)
    assert torch.equal(sel, want), (sel, want)
    _check_selection_invariants(sel, seq_lens, page, num_select, sink, local)
    # heads really choose differently (the test would not notice a head mix-up otherwise)
    assert not torch.equal(sel[0, 0], sel[0, 1])


def test_topk_kernel_ties_long_rows_and_signs():
    """Radix-select top-k on raw score rows: heavy ties (the lowest pages win, as in the
    reference), negative / +inf scores, rows longer than one kernel block (> 1024 pages),
    rows shorter than the budget; and the torch.topk fallback on tie-free rows."""
    g = torch.Generator().manual_seed(7)
    page, k, max_pages = 4, 37, 2500
    n_pages = [2500, 1300, 37, 20, 1025]
    seq_lens = torch.tensor([n * page - 1 for n in n_pages], dtype=torch.int32)
    heads = 3
    scores = torch.randint(-6, 7, (len(n_pages), heads, max_pages), generator=g).float()
    scores[:, 1] = torch.randn(len(n_pages), max_pages, generator=g) * 1e3  # tie-free head
    scores[:, 2, 5:12] = float("inf")  # forced pages
    scores[:, 2, 12:40] = -1e-30
    scores[:, 0, 1024:1100] = 100.0  # a block of ties straddling the kernel's block boundary
    for b, n in enumerate(n_pages):
        scores[b, :, n:] = float("nan")  # beyond the sequence: must never be read
    got = topk_pages(scores.to(DEVICE), seq_lens.to(DEVICE), page, k).cpu()
    want = ref_select_from_scores(scores.nan_to_num(nan=float("-inf")), seq_lens, page, k, 0, 0)
    assert torch.equal(got, want), (got - want).abs().sum()
    _check_selection_invariants(got, seq_lens.tolist(), page, k, 0, 0)
    # rows longer than the kernel's block: the multi-block loops
    looped = topk_pages(scores.to(DEVICE), seq_lens.to(DEVICE), page, k, block=1024).cpu()
    assert torch.equal(looped, want)
    fallback = topk_pages(scores[:, 1:2].to(DEVICE), seq_lens.to(DEVICE), page, k,
                          method="torch").cpu()
    assert torch.equal(fallback, want[:, 1:2])


def test_budget_larger_than_table():
    """num_select > max_pages: still [batch, heads, num_select], -1 padded."""
    page = 16
    seq_lens = [40, 3]
    q, summ, bt, sl = _setup(seq_lens, 4, 64, page)
    sel = select_pages(*_dev(q, summ, bt, sl), page, 8, 1, 1).cpu()
    assert sel.shape == (2, 2, 8)
    assert sel[0, 0].tolist() == [0, 1, 2] + [-1] * 5
    assert sel[1, 1].tolist() == [0] + [-1] * 7


def test_reselect_refreshes_local_window():
    """Selection reuse: stored raw scores + grown seq_lens -> new local pages selected, the
    rest chosen by the stale scores (equal to the reference applied to those scores)."""
    page, k, sink, local = 16, 6, 1, 2
    old = [12 * page - 1, 4 * page + 2, 5]
    q, summ, bt, sl = _setup([s + 20 for s in old], 4, 64, page, seed=2)
    old_t = torch.tensor(old, dtype=torch.int32)
    raw = torch.empty(len(old), 2, bt.shape[1], device=DEVICE)
    first = select_pages(*_dev(q, summ, bt, old_t), page, k, sink, local, raw_scores=raw).cpu()
    # Same lengths: reuse gives the same selection.
    assert torch.equal(reselect_pages(raw, old_t.to(DEVICE), page, k, sink, local).cpu(), first)
    new = torch.tensor([s + 20 for s in old], dtype=torch.int32)  # every sequence gains a page
    again = reselect_pages(raw, new.to(DEVICE), page, k, sink, local).cpu()
    want = ref_select_from_scores(ref_page_scores(q, summ, bt, old_t, page), new, page, k,
                                  sink, local)
    assert torch.equal(again, want), (again, want)
    _check_selection_invariants(again, new.tolist(), page, k, sink, local)
    assert not torch.equal(again, first)


def test_pages_and_tokens_read():
    page = 16
    sel = torch.tensor([[[0, 2, 5, -1]], [[0, 1, -1, -1]], [[DENSE_ROW, -1, -1, -1]]],
                       dtype=torch.int32)
    sl = torch.tensor([90, 20, 77], dtype=torch.int32)  # seq 0: page 5 holds 10 tokens
    assert pages_read(sel, sl, page).tolist() == [[3], [2], [5]]  # dense row: every page
    assert tokens_read(sel, sl, page).tolist() == [[42], [20], [77]]
    torch.testing.assert_close(density(sel, sl, page), torch.tensor([[42 / 90], [1.0], [1.0]]))
    empty = sel[:, :, :0]  # a zero budget reads nothing (and has no slot for the sentinel)
    assert pages_read(empty, sl, page).tolist() == [[0]] * 3
    assert tokens_read(empty, sl, page).tolist() == [[0]] * 3


# -- dense rows (dense_pages): no scoring, no top-k, the DENSE_ROW sentinel ----------------------

def _sentinel_row(k):
    return [DENSE_ROW] + [-1] * (k - 1)


@pytest.mark.parametrize("method,chunk_pages,looped", [("triton", None, False),
                                                       ("fused", 16, False),
                                                       ("torch", None, False),
                                                       ("triton", 16, True)])
def test_dense_rows_sentinel(monkeypatch, method, chunk_pages, looped):
    """Rows of num_select < n_pages <= dense_pages get exactly [DENSE_ROW, -1, ...]; shorter
    rows keep the explicit list of all their pages, longer rows the Quest top-k; every
    method agrees with the reference. Short and dense rows are not scored: their summaries are
    NaN here and reach nothing, their stored scores are +inf (the fused and torch top-k read
    them; the two-launch one reads none and none are stored); with raw scores stored every
    row is scored."""
    if looped:  # blocks of 4 pages: the output rows (6 slots) span two blocks
        monkeypatch.setattr(page_select, "_IN_REGS_PAGES_PER_8_WARPS", 16)
        monkeypatch.setattr(page_select, "_LOOP_BLOCK", 4)
    page, k, sink, local, dense = 4, 6, 1, 2, 11
    n_pages = [k + 1, 1, dense, k, 40, dense + 1, 0, 9]  # ragged; dense row first
    seq_lens = [max(0, n * page - (b % 3)) for b, n in enumerate(n_pages)]
    q, summ, bt, sl = _setup(seq_lens, 4, 32, page, seed=21)
    want = ref_select_pages(q, summ, bt, sl, page, k, sink, local, dense_pages=dense)
    for b, n in enumerate(n_pages):
        for h in range(2):
            row = want[b, h].tolist()
            if k < n <= dense:
                assert row == _sentinel_row(k), (b, row)
            elif n <= k:
                assert row == list(range(n)) + [-1] * (k - n), (b, row)
            else:
                assert DENSE_ROW not in row and -1 not in row, (b, row)
    # NaN summaries on every page of the short and dense rows: never loaded
    poisoned = summ.clone()
    for b, n in enumerate(n_pages):
        if n <= dense:
            poisoned[bt[b, :n].long()] = float("nan")
    ws = page_select.SelectWorkspace(len(seq_lens), 2, bt.shape[1], device=DEVICE)
    sel = select_pages(*_dev(q, poisoned, bt, sl), page, k, sink, local, method=method,
                       workspace=ws, chunk_pages=chunk_pages, dense_pages=dense).cpu()
    assert torch.equal(sel, want), (method, sel, want)
    for b, n in enumerate(n_pages):
        if n <= dense and method != "triton":  # ("triton" stores none for them: see
            assert (ws.scores[b, :, :n].cpu() == float("inf")).all(), b  # the test below)
    # dense_pages at or below the budget: no dense rows (the dense_pages=0 selection)
    plain = ref_select_pages(q, summ, bt, sl, page, k, sink, local)
    for dp in (0, k):
        got = select_pages(*_dev(q, summ, bt, sl), page, k, sink, local, method=method,
                           chunk_pages=chunk_pages, dense_pages=dp).cpu()
        assert torch.equal(got, plain), dp
    # raw scores stored (selection reuse): every row is scored, dense ones too
    raw = torch.full((len(seq_lens), 2, bt.shape[1]), float("nan"), device=DEVICE)
    sel = select_pages(*_dev(q, summ, bt, sl), page, k, sink, local, method=method,
                       chunk_pages=chunk_pages, dense_pages=dense, raw_scores=raw).cpu()
    assert torch.equal(sel, want)
    torch.testing.assert_close(raw.cpu(), ref_page_scores(q, summ, bt, sl, page), rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize("method", ["triton", "torch"])
def test_reselect_with_dense_rows(method):
    """Selection reuse decides dense rows on the current lengths: a row that stays within
    dense_pages keeps the sentinel, a dense row that outgrew it is selected from its stored
    raw scores, a short row that grew into the dense range becomes dense."""
    page, k, sink, local, dense = 4, 5, 1, 1, 8
    old = [7 * page, 8 * page - 1, 3 * page, 20 * page]
    new = [7 * page + 1, 8 * page + 2, 6 * page + 1, 20 * page + 3]
    q, summ, bt, sl_new = _setup(new, 4, 32, page, seed=22)
    sl_old = torch.tensor(old, dtype=torch.int32)
    raw = torch.empty(len(old), 2, bt.shape[1], device=DEVICE)
    first = select_pages(*_dev(q, summ, bt, sl_old), page, k, sink, local, raw_scores=raw,
                         dense_pages=dense).cpu()
    assert [first[b, 0].tolist() == _sentinel_row(k) for b in range(4)] == [
        True, True, False, False]
    again = reselect_pages(raw, sl_new.to(DEVICE), page, k, sink, local, method=method,
                           dense_pages=dense).cpu()
    want = ref_select_from_scores(ref_page_scores(q, summ, bt, sl_old, page), sl_new, page, k,
                                  sink, local, dense_pages=dense)
    assert torch.equal(again, want), (again, want)
    assert [again[b, 1].tolist() == _sentinel_row(k) for b in range(4)] == [
        True, False, True, False]
    assert DENSE_ROW not in again[1].flatten().tolist()  # outgrew: a real top-k selection


# -- the fused multi-chunk path (select_pages method="triton") ---------------------------------

@pytest.mark.parametrize("chunk_pages,looped,method", [(16, False, "fused"),
                                                       (32, True, "fused"),
                                                       (64, False, "triton"),
                                                       (32, True, "triton"),
                                                       (128, False, "triton")])
def test_multi_chunk_matches_reference(monkeypatch, chunk_pages, looped, method):
    """Rows spanning many scoring chunks (and partial last chunks), raw scores stored, against
    the reference, for the two-launch and the fused select; ``looped``: the top-k re-reads
    the row in blocks instead of holding it in registers."""
    if looped:
        monkeypatch.setattr(page_select, "_IN_REGS_PAGES_PER_8_WARPS", 64)
        monkeypatch.setattr(page_select, "_LOOP_BLOCK", 64)
    page, k, sink, local = 4, 24, 2, 5
    seq_lens = [75 * page - 1, 40 * page, (k - 3) * page, 1, 0]
    q, summ, bt, sl = _setup(seq_lens, 4, 16, page, seed=11)
    raw = torch.full((len(seq_lens), 2, bt.shape[1]), float("nan"), device=DEVICE)
    ws = page_select.SelectWorkspace(len(seq_lens), 2, bt.shape[1], device=DEVICE)
    args = (*_dev(q, summ, bt, sl), page, k, sink, local)
    kw = dict(workspace=ws, chunk_pages=chunk_pages, method=method)
    sel = select_pages(*args, raw_scores=raw, **kw).cpu()
    want_raw = ref_page_scores(q, summ, bt, sl, page)
    want = ref_select_from_scores(want_raw, sl, page, k, sink, local)
    assert torch.equal(sel, want), (sel, want)
    _check_selection_invariants(sel, seq_lens, page, k, sink, local)
    torch.testing.assert_close(raw.cpu(), want_raw, rtol=1e-4, atol=1e-3)
    assert (ws.counters == 0).all()  # every row's arrival counter was reset (graph replays)
    if chunk_pages == 32 and method == "fused":
        # a second launch with the same workspace (a graph replay) gives the same answer
        assert torch.equal(select_pages(*args, **kw).cpu(), want)


def test_default_chunk_pages_grows_with_the_grid(monkeypatch):
    """Pages per scoring program: 64 for small grids, doubled to 256 while the grid exceeds
    32 programs per (H100) SM, then to SCORE_CHUNK_MAX (512) while it exceeds 8; the tooling
    variable's names set the caps."""
    cpu = torch.device("cpu")
    width = 8448  # a 132K-token block table at page 16
    assert page_select.default_chunk_pages(1, 8, width, cpu) == 64
    assert page_select.default_chunk_pages(8, 8, width, cpu) == 128
    assert page_select.default_chunk_pages(16, 8, width, cpu) == 512  # 2112 programs
    assert page_select.default_chunk_pages(16, 8, 2064, cpu) == 64  # 4224 programs: not > 32/SM
    for name in page_select._TUNABLE:
        monkeypatch.setattr(page_select, name, getattr(page_select, name))  # restored after
    got = page_select.apply_tooling_env(vars(page_select), page_select._TOOLING_ENV,
                                        page_select._TUNABLE, "score_chunk_max=256")
    assert got == {"SCORE_CHUNK_MAX": 256}
    assert page_select.default_chunk_pages(16, 8, width, cpu) == 256  # session 15's rule
    page_select.apply_tooling_env(vars(page_select), page_select._TOOLING_ENV,
                                  page_select._TUNABLE, "SCORE_CHUNK_MAX=1024")
    assert page_select.default_chunk_pages(16, 8, width, cpu) == 1024  # 1152 programs
    assert page_select.default_topk_warps(8192) == page_select.default_topk_warps(8192, True) == 16
    assert page_select.default_topk_warps(2048, True) == 8
    with pytest.raises(ValueError, match="unknown constant"):
        page_select.apply_tooling_env(vars(page_select), page_select._TOOLING_ENV,
                                      page_select._TUNABLE, "CHUNK=3")


def _crafted(n_pages_list, page, head_dim, hot_pages, hot_value=1.0, num_kv_heads=2):
    """Summaries all zero (every page scores 0: ties everywhere) except the ``hot_pages``
    (logical) of every sequence, which score ``hot_value * sum(q+)`` (> 0 for a q > 0)."""
    seq_lens = [n * page for n in n_pages_list]
    g = torch.Generator().manual_seed(5)
    k, _, bt = random_paged_kv(seq_lens, num_kv_heads, head_dim, page, torch.float32,
                               generator=g)
    summ = torch.zeros((k.shape[0], 2, num_kv_heads, head_dim))
    for b, n in enumerate(n_pages_list):
        for j in hot_pages:
            if j < n:
                summ[int(bt[b, j])] = hot_value
    q = torch.rand(len(seq_lens), num_kv_heads * 2, head_dim, generator=g) + 0.1
    return q, summ, bt, torch.tensor(seq_lens, dtype=torch.int32)


def test_fused_all_candidates_in_one_chunk_and_ties_across_chunks():
    """Every scored winner sits in one chunk (chunk 3 of 16 pages); the rest of the budget is
    filled from pages tied at 0 spread over all chunks: the lowest pages win, across chunk
    boundaries, exactly as in the reference."""
    page, chunk, k, sink, local = 2, 16, 20, 1, 3
    hot = list(range(3 * chunk + 2, 3 * chunk + 9))  # 7 pages inside chunk 3
    q, summ, bt, sl = _crafted([150, 64], page, 16, hot)
    sel = select_pages(*_dev(q, summ, bt, sl), page, k, sink, local, chunk_pages=chunk,
                       method="fused").cpu()
    want = ref_select_pages(q, summ, bt, sl, page, k, sink, local)
    assert torch.equal(sel, want), (sel, want)
    n = 150
    expect = sorted({0} | set(hot) | set(range(n - local, n))
                    | set(range(1, 1 + k - 1 - len(hot) - local)))
    assert sel[0, 0].tolist() == expect
    # all tied (no hot page): sink, then the lowest pages, then the local window
    q, summ, bt, sl = _crafted([150], page, 16, [])
    sel = select_pages(*_dev(q, summ, bt, sl), page, k, sink, local, chunk_pages=chunk).cpu()
    assert sel[0, 1].tolist() == list(range(k - local)) + list(range(n - local, n))
    assert torch.equal(sel, ref_select_pages(q, summ, bt, sl, page, k, sink, local))


def test_fused_ties_straddling_chunk_boundary():
    """A block of equal scores across a chunk boundary decides the last slots: lowest first."""
    page, chunk, k = 1, 16, 10
    hot = list(range(chunk - 6, chunk + 6))  # 12 tied pages straddle the 16-page boundary
    q, summ, bt, sl = _crafted([70], page, 16, hot)
    for method in ("fused", "triton"):
        sel = select_pages(*_dev(q, summ, bt, sl), page, k, 0, 0, chunk_pages=chunk,
                           method=method).cpu()
        assert sel[0, 0].tolist() == hot[:k], method
    assert torch.equal(sel, ref_select_pages(q, summ, bt, sl, page, k, 0, 0))


def _stale_last_pages(seq_lens, bt, sl, head_dim, page, seed):
    """(k_cache, its true summaries, the summaries before this decode step's refresh: each
    sequence's last page, where the step's token was written, zeroed)."""
    g = torch.Generator().manual_seed(seed)
    k, _, _ = random_paged_kv(seq_lens, 2, head_dim, page, torch.float32, generator=g)
    summ = ref_page_summaries(k, bt, sl).nan_to_num(0.0)
    stale = summ.clone()
    for b, s in enumerate(seq_lens):
        stale[int(bt[b, (s - 1) // page])] = 0.0  # the step's page: not yet summarized
    return k, summ, stale


@pytest.mark.parametrize("page,chunk,method,local,dense", [(16, 16, "fused", 1, 0),
                                                         (4, 32, "triton", 1, 0),
                                                         (4, 16, "triton", 0, 20),
                                                         (16, 16, "torch", 0, 20)])
def test_fused_summary_refresh(page, chunk, method, local, dense):
    """select_pages(k_cache=...) on a decode step: the last page's summary (stale in the
    buffer) is recomputed in the same launch and used for scoring (also with no forced local
    page, where the last page's score decides); dense rows (``dense``) and short rows are
    refreshed too, though they are not scored."""
    # partial last page, full last page, one page, a dense row (with dense=20)
    seq_lens = [40 * page + 3, 16 * page, 5, 20 * page - 1]
    q, summ, bt, sl = _setup(seq_lens, 4, 64, page, seed=12)
    k, summ, stale = _stale_last_pages(seq_lens, bt, sl, 64, page, seed=13)
    raw = torch.empty(len(seq_lens), 2, bt.shape[1], device=DEVICE)
    num_select, sink = 6, 1
    stale_d = stale.clone().to(DEVICE)
    want = ref_select_pages(q, summ, bt, sl, page, num_select, sink, local, dense)
    sel = select_pages(*_dev(q), stale_d, *_dev(bt, sl), page, num_select, sink, local,
                       raw_scores=raw, k_cache=k.to(DEVICE), chunk_pages=chunk,
                       method=method, dense_pages=dense).cpu()
    torch.testing.assert_close(stale_d.cpu(), summ)
    assert torch.equal(sel, want)
    assert (sel[3, :, 0] == DENSE_ROW).all() == (dense > 0)
    torch.testing.assert_close(raw.cpu(), ref_page_scores(q, summ, bt, sl, page), rtol=1e-4,
                               atol=1e-3)
    # without raw scores (dense and short rows unscored): still refreshed, same selection
    stale_d = stale.clone().to(DEVICE)
    sel = select_pages(*_dev(q), stale_d, *_dev(bt, sl), page, num_select, sink, local,
                       k_cache=k.to(DEVICE), chunk_pages=chunk, method=method,
                       dense_pages=dense).cpu()
    torch.testing.assert_close(stale_d.cpu(), summ)
    assert torch.equal(sel, want)


def test_reselect_torch_matches_triton():
    page, k, sink, local = 4, 12, 1, 2
    seq_lens = [90 * page + 1, 30 * page]
    q, summ, bt, sl = _setup(seq_lens, 4, 32, page, seed=14)
    raw = torch.empty(len(seq_lens), 2, bt.shape[1], device=DEVICE)
    select_pages(*_dev(q, summ, bt, sl), page, k, sink, local, raw_scores=raw, chunk_pages=32)
    new = (sl + 2).to(DEVICE)  # within the block table
    a = reselect_pages(raw, new, page, k, sink, local).cpu()
    b = reselect_pages(raw, new, page, k, sink, local, method="torch").cpu()
    assert torch.equal(a, b)


@pytest.mark.parametrize("block", [None, 32])
def test_topk_adaptive_radix_edge_rows(block):
    """Rows that exercise the row-adaptive radix start: more forced (+inf) pages than the
    budget, all finite scores equal, a single distinct value above ties, scores spanning the
    sign bit, tiny differences in the last mantissa bit, and rows of one exponent."""
    page, k, n = 1, 7, 64
    rows = [
        torch.full((n,), float("inf")),  # every page forced
        torch.full((n,), 3.25),  # all equal
        torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), 2.0)]),
        torch.linspace(-5, 5, n),
        1.0 + torch.arange(n) * 2.0 ** -23,  # one exponent, last mantissa bits differ
        torch.where(torch.arange(n) % 9 == 0, float("inf"), torch.linspace(8, 9, n)),
    ]
    scores = torch.stack(rows)[:, None, :].repeat(1, 2, 1).float()
    scores[:, 1] = scores[:, 1].flip(-1)
    seq_lens = torch.full((len(rows),), n * page, dtype=torch.int32)
    got = topk_pages(scores.to(DEVICE), seq_lens.to(DEVICE), page, k, block=block).cpu()
    want = ref_select_from_scores(scores, seq_lens, page, k, 0, 0)
    assert torch.equal(got, want), (got, want)


def test_wide_block_table_skips_tail_chunks_and_ignores_stale_scores():
    """An engine's block table is as wide as its longest possible sequence: scoring programs
    past a sequence's pages return at once, so the workspace beyond n_pages keeps whatever an
    earlier step left there (+inf here, which would win every slot if it were read)."""
    page, num_select, sink, local = 16, 8, 1, 2
    seq_lens = [30 * page + 5, 12 * page, 3]
    q, summ, bt, sl = _setup(seq_lens, 4, 64, page, seed=5)
    wide = torch.zeros(len(seq_lens), 400, dtype=bt.dtype)  # 400 pages: chunks of 64 -> 7
    wide[:, : bt.shape[1]] = bt
    ws = page_select.SelectWorkspace(len(seq_lens), 2, wide.shape[1], torch.device(DEVICE),
                                     counters=False)
    scores, _ = ws.views(len(seq_lens), 2, wide.shape[1])
    scores.fill_(float("inf"))
    want = ref_select_pages(q, summ, bt, sl, page, num_select, sink, local)
    sel = select_pages(*_dev(q, summ, wide, sl), page, num_select, sink, local,
                       workspace=ws, chunk_pages=64).cpu()
    assert torch.equal(sel, want), (sel, want)
    # the tail really was skipped: the stale +inf is still there past the longest row
    assert (scores[0, :, 31 + 64:].cpu() == float("inf")).all()


@pytest.mark.parametrize("topk_method", ["single", "two_stage"])
def test_short_and_dense_rows_store_no_scores_but_refresh_summaries(topk_method):
    """Rows whose top-k reads no score (at most the budget's pages, or dense rows) end their
    scoring programs after the summary refresh: their workspace rows keep what was there
    (NaN), the selection is the reference's, and their last page's summary is refreshed."""
    page, num_select, sink, local, dense = 4, 8, 1, 2, 20
    seq_lens = [40 * page + 1, 15 * page + 3, 5 * page]  # sparse, dense, short
    q, _, bt, sl = _setup(seq_lens, 4, 16, page, seed=31)
    kc, summ, stale = _stale_last_pages(seq_lens, bt, sl, 16, page, seed=32)
    ws = page_select.SelectWorkspace(len(seq_lens), 2, bt.shape[1], torch.device(DEVICE),
                                     counters=False)
    scores, _ = ws.views(len(seq_lens), 2, bt.shape[1])
    scores.fill_(float("nan"))
    stale_d = stale.to(DEVICE)
    seg = 16 if topk_method == "two_stage" else None
    sel = select_pages(*_dev(q), stale_d, *_dev(bt, sl), page, num_select, sink, local,
                       workspace=ws, chunk_pages=16, k_cache=kc.to(DEVICE), dense_pages=dense,
                       topk_method=topk_method, segment_pages=seg).cpu()
    torch.testing.assert_close(stale_d.cpu(), summ)
    assert torch.equal(sel, ref_select_pages(q, summ, bt, sl, page, num_select, sink, local,
                                             dense))
    assert sel[1, :, 0].tolist() == [DENSE_ROW] * 2
    sc = scores.cpu()
    assert sc[1:].isnan().all()  # the dense and the short row: nothing stored
    assert not sc[0, :, :40].isnan().any()  # the sparse row: every page scored


# -- two-stage top-k (segment candidates, then the top-k of each row's candidates) ------------

def _two_stage_rows(n_pages, max_pages, k, seg, seed):
    """Score rows for the two-stage checks: head 0 heavy integer ties (negative too) with a
    tied block of winners straddling every segment boundary; head 1 tie-free negative
    scores, +inf forced pages across segments (more than the budget in row 0), and a row of
    mostly ``-inf`` (valid) scores. Beyond each row's pages: NaN (never to be read)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 3, (len(n_pages), 2, max_pages), generator=g).float()
    for b0 in range(seg, max_pages, seg):  # ties at 9 straddle each segment boundary
        scores[:, 0, max(0, b0 - 2): b0 + 2] = 9.0
    scores[:, 1] = -torch.rand(len(n_pages), max_pages, generator=g) * 100 - 1
    scores[:, 1, :2] = float("inf")  # sink-like
    scores[:, 1, 1::seg] = float("inf")  # one forced page in every segment
    scores[0, 1, : k + 3] = float("inf")  # more forced pages than the budget
    scores[1, 1, 3:] = float("-inf")  # valid -inf pages: ties at the bottom
    for b, n in enumerate(n_pages):
        scores[b, :, n:] = float("nan")
    return scores


def _topk_all_ways(scores, n_pages, page, k, seg, dense_pages=0):
    seq_lens = torch.tensor([max(0, n * page - (b % page)) for b, n in enumerate(n_pages)],
                            dtype=torch.int32)
    sc, sl = scores.to(DEVICE), seq_lens.to(DEVICE)
    two = topk_pages(sc, sl, page, k, dense_pages=dense_pages, topk_method="two_stage",
                     segment_pages=seg).cpu()
    single = topk_pages(sc, sl, page, k, dense_pages=dense_pages, topk_method="single").cpu()
    want = ref_select_from_scores(scores.nan_to_num(nan=float("-inf")), seq_lens, page, k, 0,
                                  0, dense_pages=dense_pages)
    return two, single, want, seq_lens


@pytest.mark.parametrize("k,seg,max_pages", [
    (5, 16, 100),   # budget not a power of two, 7 segments, a partial last one
    (7, 12, 90),    # segment not a power of two (masked tile lanes)
    (6, 4, 40),     # segments smaller than the budget: candidates are whole segments
    (12, 128, 60),  # S = 1: one segment holds the whole row
])
def test_two_stage_matches_single_and_reference(k, seg, max_pages):
    """Two-stage == single-stage == reference on ragged rows: empty, one page, shorter than
    the budget, at it, just above it, a partial last segment, rows whose trailing segments
    are past their pages, full rows; heavy ties across segment boundaries, +inf and -inf
    pages, negative scores; with and without dense rows."""
    page = 2
    n_pages = [max_pages, max_pages - 1, 0, 1, k - 1, k, k + 1, k + 2, max_pages // 3 + 1,
               2 * seg + 1]
    n_pages = [min(n, max_pages) for n in n_pages]
    scores = _two_stage_rows(n_pages, max_pages, k, seg, seed=k)
    two, single, want, seq_lens = _topk_all_ways(scores, n_pages, page, k, seg)
    assert torch.equal(single, want), (single, want)
    assert torch.equal(two, want), (two, want)
    _check_selection_invariants(two, [int(s) for s in seq_lens], page, k, 0, 0)
    # dense rows (k < n_pages <= k + 1), on the rows that tell: full, empty, k, k+1, k+2
    rows = [0, 2, 5, 6, 7]
    two_d, single_d, want_d, _ = _topk_all_ways(scores[rows], [n_pages[r] for r in rows], page,
                                                k, seg, dense_pages=k + 1)
    assert torch.equal(single_d, want_d) and torch.equal(two_d, want_d), (two_d, want_d)
    assert two_d[3].tolist() == [_sentinel_row(k)] * 2  # k + 1 pages: dense
    assert DENSE_ROW not in two_d[4].flatten().tolist()  # k + 2 pages: selected
    assert two_d[2].tolist() == [list(range(k))] * 2  # k pages: all listed
    # the checks see the tie rule: the tied winners straddling segment boundaries are cut
    if 2 * seg < max_pages and seg > 2:
        row = two[0, 0].tolist()
        tied = [j for j in range(max_pages) if float(scores[0, 0, j]) == 9.0]
        assert len(tied) > k and row == tied[:k], (row, tied)


def test_two_stage_ties_decided_in_stage_two():
    """Every segment's candidates tie with every other segment's (all scores equal but a few
    winners per segment): stage 2 must take the lowest pages among the tied candidates of
    different segments, and stage 1 the lowest within each segment."""
    page, k, seg, n = 1, 9, 8, 64
    scores = torch.zeros(1, 2, n)
    scores[0, :, 5::seg] = 1.0  # 8 winners, one per segment; 1 slot left to the tied zeros
    scores[0, 1] = scores[0, 1].flip(-1)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    two = topk_pages(scores.to(DEVICE), seq_lens.to(DEVICE), page, k, topk_method="two_stage",
                     segment_pages=seg).cpu()
    assert two[0, 0].tolist() == [0] + list(range(5, n, seg))
    assert two[0, 1].tolist() == [0] + list(range(n - 1 - 5 - 7 * seg, n, seg))
    assert torch.equal(two, ref_select_from_scores(scores, seq_lens, page, k, 0, 0))
    # all tied: the first pages, although every segment offers candidates (k = 9: whole
    # segments pass; k = 5 < seg: stage 1 cuts each segment's ties itself)
    flat = torch.full((1, 2, n), -0.5)
    for kk in (k, 5):
        two = topk_pages(flat.to(DEVICE), seq_lens.to(DEVICE), page, kk,
                         topk_method="two_stage", segment_pages=seg).cpu()
        assert two[0].tolist() == [list(range(kk))] * 2, kk


def test_two_stage_select_pages_auto_workspace_and_stale_candidates(monkeypatch):
    """select_pages end to end (scoring with sink / local forcing, dense rows): the "auto"
    heuristic on a 132-SM device takes the two-stage path at batch 1 and long rows and not
    at batch 16 (spied); results equal single-stage and the reference. A workspace reused with
    shorter rows (a CUDA-graph replay: segments past the new rows keep the candidates of the
    longer ones) still gives the exact answer."""
    from sparse_kernels import sparse_decode

    monkeypatch.setattr(sparse_decode, "_device_sms", lambda device: 132)
    monkeypatch.setattr(page_select, "TWO_STAGE_MIN_PAGES", 0)  # small rows, for the CPU
    calls = []
    real = page_select._two_stage_launch
    monkeypatch.setattr(page_select, "_two_stage_launch",
                        lambda *a, **kw: calls.append(a[-4]) or real(*a, **kw))
    page, k, sink, local = 4, 8, 1, 2
    q, summ, bt, sl = _setup([150 * page - 1], 4, 16, page, seed=31)
    args = (*_dev(q, summ, bt), page, k, sink, local)
    assert page_select.use_two_stage(1, 2, bt.shape[1], k, DEVICE)
    assert not page_select.use_two_stage(64, 2, bt.shape[1], k, DEVICE)
    ws = page_select.SelectWorkspace(1, 2, bt.shape[1], device=DEVICE, counters=False)
    assert ws.cand_keys.numel() >= 2 * bt.shape[1]  # sized for the auto path, no growth
    buf = ws.cand_keys
    want = ref_select_pages(q, summ, bt, sl, page, k, sink, local)
    assert page_select.DEFAULT_TOPK_METHOD == "auto"
    got = select_pages(*args[:3], sl.to(DEVICE), *args[3:], workspace=ws,
                       topk_method="auto").cpu()
    assert calls == [None] and torch.equal(got, want), (got, want)
    assert ws.cand_keys is buf
    single = select_pages(*args[:3], sl.to(DEVICE), *args[3:], workspace=ws,
                          topk_method="single").cpu()
    assert len(calls) == 1 and torch.equal(single, want)
    # shorter rows, same workspace: stale candidates of segments 2.. must not be read
    for n in (40, 9, 5):  # two segments, just above the budget with dense rows, short
        short = torch.tensor([n * page], dtype=torch.int32)
        want_s = ref_select_pages(q, summ, bt, short, page, k, sink, local, dense_pages=9)
        got_s = select_pages(*args[:3], short.to(DEVICE), *args[3:], workspace=ws,
                             segment_pages=32, dense_pages=9, topk_method="auto").cpu()
        assert torch.equal(got_s, want_s), (n, got_s, want_s)
    # batch 16: auto keeps the single-stage kernel
    calls.clear()
    q16, summ16, bt16, sl16 = _setup([60 * page] * 16, 4, 16, page, seed=32)
    got16 = select_pages(*_dev(q16, summ16, bt16, sl16), page, k, sink, local,
                         topk_method="auto").cpu()
    assert calls == [] and torch.equal(
        got16, ref_select_pages(q16, summ16, bt16, sl16, page, k, sink, local))


def test_two_stage_reselect_forces_in_stage_one():
    """Selection reuse through the two-stage path: sink / local pages and pages without a
    stored score are forced by stage 1 for the current lengths; same as single-stage."""
    page, k, sink, local = 4, 6, 1, 2
    old = torch.tensor([50 * page - 1, 30 * page], dtype=torch.int32)
    q, summ, bt, _ = _setup([int(s) + 9 for s in old], 4, 32, page, seed=33)
    raw = torch.empty(len(old), 2, bt.shape[1], device=DEVICE)
    select_pages(*_dev(q, summ, bt, old), page, k, sink, local, raw_scores=raw,
                 topk_method="single")
    # grown within the local window: the reference applies
    near = old + 5
    two = reselect_pages(raw, near.to(DEVICE), page, k, sink, local, topk_method="two_stage",
                         segment_pages=16).cpu()
    want = ref_select_from_scores(ref_page_scores(q, summ, bt, old, page), near, page, k,
                                  sink, local)
    assert torch.equal(two, want), (two, want)
    # grown past it: the unscored page 30 of row 1 is forced (not in the reference's model)
    far = old + 9
    two = reselect_pages(raw, far.to(DEVICE), page, k, sink, local, topk_method="two_stage",
                         segment_pages=16).cpu()
    single = reselect_pages(raw, far.to(DEVICE), page, k, sink, local,
                            topk_method="single").cpu()
    assert torch.equal(two, single), (two, single)
    assert (two[1, :, :] == 30).any(dim=-1).all()


def test_two_stage_plan_and_workspace_sizing(monkeypatch):
    """Plan / heuristic on a 132-SM device (host ints only) and the workspace's candidate
    capacity covering every plan the heuristic picks; explicit plans that do not fit raise."""
    from sparse_kernels import sparse_decode

    monkeypatch.setattr(sparse_decode, "_device_sms", lambda device: 132)
    ps = page_select
    assert ps.two_stage_plan(1, 8, 8192, 128, DEVICE) == (1024, 8)
    assert ps.use_two_stage(1, 8, 8192, 128, DEVICE)
    assert ps.use_two_stage(1, 8, 8256, 256, DEVICE)  # vLLM's padded table width
    assert not ps.use_two_stage(16, 8, 8192, 128, DEVICE)  # grid large enough already
    assert not ps.use_two_stage(1, 8, 400, 128, DEVICE)  # row shorter than 4x the budget
    assert not ps.use_two_stage(1, 8, 1024, 128, DEVICE)  # too little to win
    assert not ps.use_two_stage(1, 8, 2048, 128, DEVICE)  # 32K tokens: measured slower
    assert ps.use_two_stage(1, 8, 8256, 512, DEVICE)  # 128K at the default 8192-token budget
    assert ps.resolve_topk_method("auto", 1, 8, 8192, 128, DEVICE, block=1024) == "single"
    with pytest.raises(ValueError):
        ps.resolve_topk_method("two_stage", 1, 8, 8192, 128, DEVICE, segment_pages=16384)
    with pytest.raises(ValueError):
        ps.resolve_topk_method("bogus", 1, 8, 8192, 128, DEVICE)
    for heads in (1, 2, 8):
        for width in (512, 2048, 8256, 16384, 65536):
            cap = ps.default_candidate_capacity(256, heads, width, DEVICE)
            for batch in range(1, 80):
                for k in (16, 100, 128, 512):
                    if ps.use_two_stage(batch, heads, width, k, DEVICE):
                        seg, n_seg = ps.two_stage_plan(batch, heads, width, k, DEVICE)
                        assert seg >= 2 * k and n_seg >= 2
                        assert batch * heads * n_seg * k <= cap, (heads, width, batch, k)
    # a forced plan the workspace was not sized for grows it (outside graph capture)
    ws = ps.SelectWorkspace(2, 2, 64, device=DEVICE, counters=False, candidates=0)
    keys, pages = ws.candidate_views(2, 2, 40)
    assert keys.shape == pages.shape == (2, 2, 40) and ws.cand_keys.numel() == 160

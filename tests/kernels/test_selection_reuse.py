"""Selection reuse across decode steps (sparse_kernels.selection_reuse) and the ``keep`` rows of
the selection and decode pipeline, against references."""

import os
import random

import pytest
import torch

from sparse_kernels import page_select
from sparse_kernels.config import SparseConfig
from sparse_kernels.page_select import select_pages
from sparse_kernels.reference import random_paged_kv
from sparse_kernels.reference_decode import (
    ref_page_summaries,
    ref_select_pages,
    ref_sparse_decode,
)
from sparse_kernels.selection_reuse import (
    new_reuse_state,
    update_reuse_rows,
    update_reuse_rows_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def _step(state, keep, seq_lens, bt, nd, page, r, counts=None, after=0):
    """One kernel update, checked against the reference (state before the update)."""
    want_state, want_keep = update_reuse_rows_reference(state.cpu(), seq_lens.cpu(), bt.cpu(),
                                                        nd, page, r, reuse_after=after)
    update_reuse_rows(state, keep, seq_lens.to(DEVICE), bt.to(DEVICE), nd, page, r,
                      counts=counts, reuse_after=after)
    assert torch.equal(state.cpu(), want_state), (state, want_state)
    assert torch.equal(keep.cpu(), want_keep), (keep, want_keep)
    return keep.cpu().tolist()


@pytest.mark.parametrize("page,r", [(16, 4), (1, 4), (64, 8), (16, 1)])
def test_one_request_keeps_until_r_steps_or_a_new_page(page, r):
    """A request decoding in row 0 selects, then keeps for ``r - 1`` steps, and selects again
    whenever its newest token starts a page."""
    max_rows = 3
    state, keep = new_reuse_state(max_rows, DEVICE)
    bt = torch.arange(1, 1 + 64, dtype=torch.int32)[None].repeat(max_rows, 1) * 7
    got, want = [], []
    sel_len = None
    for n in range(5 * page + 3, 5 * page + 3 + 3 * max(page, r) + 5):
        seq = torch.tensor([n, 0, 0], dtype=torch.int32)
        got.append(_step(state, keep, seq, bt, 1, page, r)[0])
        same_page = sel_len is not None and (sel_len - 1) // page == (n - 1) // page
        k = int(sel_len is not None and same_page and 1 <= n - sel_len < r)
        want.append(k)
        if not k:
            sel_len = n
    assert got == want
    if r > 1 and page >= r:
        assert sum(got) > 0
    if r == 1 or page == 1:
        assert sum(got) == 0  # page 1: every token starts a page


@pytest.mark.parametrize("page,r,after", [(16, 4, 32), (16, 4, 5), (64, 8, 20), (16, 4, 0)])
def test_first_tokens_of_a_request_always_select(page, r, after):
    """``reuse_after``: a request's first ``after`` generated tokens select every step (page
    crossings do not restart the count); after them it keeps as without the option; a new
    request in the row (after a prefill step) starts counting again."""
    state, keep = new_reuse_state(2, DEVICE)
    bt = torch.arange(1, 1 + 64, dtype=torch.int32)[None].repeat(2, 1) * 3
    for _ in range(2):  # the second request: the same row after a step as a prefill row
        n0 = 5 * page + 3
        got, want = [], []
        sel_len = None
        for n in range(n0, n0 + after + 3 * max(page, r) + 5):
            seq = torch.tensor([n, 0], dtype=torch.int32)
            got.append(_step(state, keep, seq, bt, 1, page, r, after=after)[0])
            same_page = sel_len is not None and (sel_len - 1) // page == (n - 1) // page
            k = int(sel_len is not None and same_page and 1 <= n - sel_len < r
                    and n - n0 >= after)
            want.append(k)
            if not k:
                sel_len = n
        assert got == want
        assert sum(got[:after]) == 0 and sum(got[after:]) > 0
        # a prefill step in the row: the next decode is a new request
        _step(state, keep, torch.tensor([n + 1, 0], dtype=torch.int32), bt, 0, page, r,
              after=after)


def test_moved_new_and_non_decode_rows_select():
    """Rows hold different requests from one step to the next: a request that moved rows, a
    new request sharing the old one's first page (a cached prefix) but not its last page, a
    row that was a prefill row, padding rows and rows past the batch all select; the counters
    add the kept and the decode rows."""
    page, r = 16, 4
    state, keep = new_reuse_state(6, DEVICE)
    counts = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    # requests: A (pages 10..), B (20..), C shares A's page 0, own pages from 40
    A = [10 + i for i in range(8)]
    B = [20 + i for i in range(8)]
    C = [10] + [40 + i for i in range(7)]
    bt0 = torch.tensor([A, B, C, B], dtype=torch.int32)
    # step 1: A, B decode (rows 0, 1); row 2: C prefill; row 3: padding (length 0)
    assert _step(state, keep, torch.tensor([50, 60, 48, 0], dtype=torch.int32), bt0, 2, page, r,
                 counts) == [0] * 6
    # step 2: same rows, one token more: both keep; C is now a decode row: selects
    assert _step(state, keep, torch.tensor([51, 61, 49, 0], dtype=torch.int32), bt0, 3, page,
                 r, counts) == [1, 1, 0, 0, 0, 0]
    # step 3: B moved to row 0, A to row 1 (a condensed batch), C in row 2 keeps
    bt1 = torch.tensor([B, A, C], dtype=torch.int32)
    assert _step(state, keep, torch.tensor([62, 52, 50], dtype=torch.int32), bt1, 3, page, r,
                 counts) == [0, 0, 1, 0, 0, 0]
    # step 4: row 0 gets C' (a new request with A's first page and length just above A's
    # selection), row 1 keeps A ... C' does not match B's tags
    bt2 = torch.tensor([C, A, C], dtype=torch.int32)
    assert _step(state, keep, torch.tensor([63, 53, 51], dtype=torch.int32), bt2, 3, page, r,
                 counts) == [0, 1, 1, 0, 0, 0]
    # step 5: a batch of prefill rows only: every tag is cleared
    assert _step(state, keep, torch.tensor([64, 54, 52], dtype=torch.int32), bt2, 0, page, r,
                 counts) == [0] * 6
    assert (state[2].cpu() == 0).all()
    # step 6: the same requests decode again: they select (no tag survived a step off)
    assert _step(state, keep, torch.tensor([65, 55, 53], dtype=torch.int32), bt2, 3, page, r,
                 counts) == [0] * 6
    assert counts.cpu().tolist() == [5.0, 2 + 3 + 3 + 3 + 0 + 3]


def test_random_steps_match_reference():
    """Random batches over many steps (requests finishing, joining, moving, prefill rows,
    padding) against the reference, page sizes 1, 16 and 64."""
    rng = random.Random(5)
    for page, r, after in ((16, 4, 0), (1, 3, 0), (64, 16, 0), (16, 4, 7), (64, 8, 32)):
        max_rows, width = 8, 12
        state, keep = new_reuse_state(max_rows, DEVICE)
        reqs = []
        next_block = 1
        for _ in range(40):
            # finish some, start some (new page ids), grow the others by one token
            reqs = [q for q in reqs if rng.random() > 0.1]
            while len(reqs) < max_rows and rng.random() < 0.5:
                n0 = rng.randint(1, page * (width - 2))
                pages = list(range(next_block, next_block + width))
                if reqs and rng.random() < 0.3:
                    pages[0] = reqs[0]["pages"][0]  # a shared first page
                next_block += width
                reqs.append({"pages": pages, "n": n0})
            rng.shuffle(reqs) if rng.random() < 0.2 else None
            for q in reqs:
                q["n"] = min(q["n"] + 1, page * width)
            nd = rng.randint(0, len(reqs))
            seq = torch.zeros(max_rows, dtype=torch.int32)
            bt = torch.zeros(max_rows, width, dtype=torch.int32)
            for i, q in enumerate(reqs):
                seq[i] = q["n"] if rng.random() > 0.05 else 0
                bt[i] = torch.tensor(q["pages"], dtype=torch.int32)
            _step(state, keep, seq, bt, nd, page, r, after=after)


def _case(seq_lens, page, group=4, d=32, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v, bt = random_paged_kv(seq_lens, hkv, d, page, generator=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    summ = ref_page_summaries(k, bt, sl).nan_to_num(0.0)
    q = torch.randn(len(seq_lens), hkv * group, d, generator=g)
    return q, k, v, summ, bt, sl


@pytest.mark.parametrize("method,topk_method", [("triton", "single"), ("triton", "two_stage"),
                                                ("fused", "auto"), ("torch", "single")])
def test_select_pages_keeps_flagged_rows(monkeypatch, method, topk_method):
    """Flagged rows of the output keep what was there (not scored, not selected); the other
    rows equal a fresh selection, for every selection launch."""
    monkeypatch.setattr(page_select, "TWO_STAGE_MIN_PAGES", 0)
    page, k, sink, local = 4, 6, 1, 2
    seq_lens = [150, 90, 13, 0, 200]
    q, _, _, summ, bt, sl = _case(seq_lens, page, seed=3)
    want = ref_select_pages(q, summ, bt, sl, page, k, sink, local, dense_pages=30)
    keep = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.int32)  # (longer than the batch)
    old = torch.full((len(seq_lens), 2, k), 777, dtype=torch.int32)
    out = old.clone().to(DEVICE)
    ws = page_select.SelectWorkspace(len(seq_lens), 2, bt.shape[1], device=DEVICE,
                                     counters=method == "fused")
    kw = {"segment_pages": 32} if topk_method == "two_stage" else {}
    got = select_pages(q.to(DEVICE), summ.to(DEVICE), bt.to(DEVICE), sl.to(DEVICE), page, k,
                       sink, local, out=out, method=method, topk_method=topk_method,
                       workspace=ws, dense_pages=30, keep=keep.to(DEVICE), **kw).cpu()
    for b in range(len(seq_lens)):
        if keep[b]:
            assert torch.equal(got[b], old[b]), b
        else:
            assert torch.equal(got[b], want[b]), (b, got[b], want[b])
    with pytest.raises(ValueError, match="output buffer"):
        page_select._topk_launch(torch.zeros(1, 2, 8), sl[:1], page, k, 0, 0, 0, False, None,
                                 "triton", None, None, keep=keep)


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_attention_over_a_kept_selection(overlap):
    """Two decode steps through decode_attention with reuse: step 1 selects; step 2 (one more
    token on the same pages, a new query) keeps the long rows' selections (flags from
    update_reuse_rows) and attends over them; a row that starts a page selects afresh. Each
    step's output equals the reference over the selection in force."""
    from sparse_kernels.page_summary import allocate_page_summaries, build_page_summaries
    from sparse_kernels.pipeline import decode_attention

    page = 16
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, selection_reuse=4,
                       decode_overlap=overlap, decode_min_seq_len=64)
    cfg.validate()
    # row 0: long, keeps; row 1: long, its next token starts page 10 (selects); row 2: within
    # the budget (reads all); row 3: long, keeps
    step1 = [300, 160, 40, 500]
    step2 = [301, 161, 41, 501]
    q1, k, v, _, bt, _ = _case([s + 1 for s in step1], page, seed=7)
    q2 = torch.randn(q1.shape, generator=torch.Generator().manual_seed(8))
    q1, q2, k, v, bt = (x.to(DEVICE) for x in (q1, q2, k, v, bt))
    summ = allocate_page_summaries(k)
    state, keep = new_reuse_state(6, DEVICE)
    selected = torch.full((6, 2, cfg.token_budget // page), -1, dtype=torch.int32,
                          device=DEVICE)
    sels = []
    for seq, q in ((step1, q1), (step2, q2)):
        sl = torch.tensor(seq, dtype=torch.int32, device=DEVICE)
        build_page_summaries(k, summ, bt, sl)
        update_reuse_rows(state, keep, sl, bt, len(seq), page, cfg.selection_reuse)
        before = selected.clone()
        out = torch.full_like(q, float("nan"))
        decode_attention("topk", cfg, q, k, v, summ, bt, sl, out, 32 ** -0.5,
                         selected=selected, keep=keep)
        flags = keep.cpu().tolist()[:4]
        fresh = ref_select_pages(q.cpu(), summ.cpu(), bt.cpu(), sl.cpu(), page,
                                 cfg.token_budget // page, 1, 1, dense_pages=4)
        in_force = torch.where(torch.tensor(flags)[:, None, None] != 0, before[:4].cpu(), fresh)
        assert torch.equal(selected[:4].cpu(), in_force)
        want = ref_sparse_decode(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), in_force,
                                 32 ** -0.5)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4)
        sels.append((flags, fresh))
    assert sels[0][0] == [0, 0, 0, 0] and sels[1][0] == [1, 0, 1, 1]
    # the kept rows' fresh selection differs from the kept one somewhere (the new query),
    # so the test tells a kept selection from a fresh one
    assert not torch.equal(sels[1][1][[0, 3]], sels[0][1][[0, 3]])
    with pytest.raises(ValueError, match="selection buffer"):
        decode_attention("topk", cfg, q1, k, v, summ, bt, sl, out, 1.0, keep=keep)

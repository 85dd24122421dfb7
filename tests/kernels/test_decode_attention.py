"""Sparse / dense paged decode attention vs the references."""

import os

import pytest
import torch

from sparse_kernels.page_select import DENSE_ROW, select_pages
from sparse_kernels.page_summary import allocate_page_summaries, build_page_summaries
from sparse_kernels.reference import dense_attention, random_paged_kv
from sparse_kernels.reference_decode import ref_select_pages, ref_sparse_decode
from sparse_kernels.sparse_decode import DecodeWorkspace, sparse_decode

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _setup(seq_lens, group, head_dim, page, dtype, layout, num_kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v, bt = random_paged_kv(seq_lens, num_kv_heads, head_dim, page, dtype, layout,
                               generator=g)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    return q, k, v, bt, torch.tensor(seq_lens, dtype=torch.int32)


def _dev(*xs):
    return [x.to(DEVICE) for x in xs]


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)


def _dense_ref(q, k, v, bt, sl):
    qsl = torch.arange(len(sl) + 1, dtype=torch.int32)
    return dense_attention(q, k, v, bt, qsl, sl)


# (dtype, layout, page, group, head_dim, num_splits, block_n): each GQA group (1, 4, 7, 8),
# head dim (64, 128), page size (1, 16, 64), layout and dtype appears at least once.
DENSE_CASES = [
    (torch.float32, "NHD", 16, 4, 64, None, 16),
    (torch.float32, "HND", 1, 7, 128, 3, 16),
    (torch.float32, "interleaved", 64, 8, 64, 1, 32),
    (torch.bfloat16, "interleaved", 16, 8, 128, None, 64),
    (torch.bfloat16, "NHD", 64, 1, 64, 2, 16),
    (torch.float16, "HND", 16, 7, 64, 4, 32),
]


@pytest.mark.parametrize("dtype,layout,page,group,head_dim,num_splits,block_n", DENSE_CASES)
def test_dense_mode_equals_dense_attention(dtype, layout, page, group, head_dim, num_splits,
                                           block_n):
    seq_lens = [1, 77, 3 * page + 5, 33]  # ragged; partial last pages; a 1-token sequence
    q, k, v, bt, sl = _setup(seq_lens, group, head_dim, page, dtype, layout)
    out = sparse_decode(*_dev(q, k, v, bt, sl), selected=None, num_splits=num_splits,
                        block_n=block_n)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, _dense_ref(q, k, v, bt, sl), dtype)


@pytest.mark.parametrize("dtype,layout,page", [(torch.float32, "HND", 16),
                                               (torch.bfloat16, "interleaved", 1)])
def test_all_pages_selected_equals_dense_attention(dtype, layout, page):
    """The sparse path with every page listed (and -1 padding) is dense attention."""
    seq_lens = [50, 3 * page + 1, 7]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, dtype, layout, seed=1)
    num_select = bt.shape[1] + 2
    sel = torch.full((len(seq_lens), 2, num_select), -1, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page)
        sel[b, :, :n] = torch.arange(n, dtype=torch.int32)
    out = sparse_decode(*_dev(q, k, v, bt, sl, sel), num_splits=2, block_n=16)
    _close(out, _dense_ref(q, k, v, bt, sl), dtype)


def _random_selection(seq_lens, page, num_kv_heads, num_select, seed):
    """Different sorted random page subsets per (sequence, head), -1 padded at the end."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.full((len(seq_lens), num_kv_heads, num_select), -1, dtype=torch.int32)
    for b, s in enumerate(seq_lens):
        n = -(-s // page)
        for h in range(num_kv_heads):
            m = min(n, num_select)
            if n > num_select:
                m = int(torch.randint(max(1, num_select // 2), num_select + 1, (1,), generator=g))
            pages = torch.randperm(n, generator=g)[:m].sort().values
            sel[b, h, :m] = pages.to(torch.int32)
    return sel


@pytest.mark.parametrize(
    "dtype,layout,page,group,head_dim,num_select",
    [
        (torch.float32, "NHD", 16, 7, 64, 5),
        (torch.float32, "interleaved", 1, 4, 128, 40),
        (torch.bfloat16, "HND", 64, 8, 64, 2),
        (torch.float16, "NHD", 16, 1, 128, 4),
    ],
)
def test_page_list_matches_masked_reference(dtype, layout, page, group, head_dim, num_select):
    # the last sequence is shorter than the budget (selects all its pages)
    seq_lens = [(2 * num_select + 1) * page + 3, (num_select + 2) * page,
                max(1, (num_select - 1) * page - 2)]
    q, k, v, bt, sl = _setup(seq_lens, group, head_dim, page, dtype, layout, seed=2)
    sel = _random_selection(seq_lens, page, 2, num_select, seed=3)
    out = sparse_decode(*_dev(q, k, v, bt, sl, sel), num_splits=3, block_n=16)
    want = ref_sparse_decode(q, k, v, bt, sl, sel)
    _close(out, want, dtype)
    # The selection matters: the result is far from dense attention.
    assert (want - _dense_ref(q, k, v, bt, sl)).abs().max() > 10 * TOL[dtype]


def test_splits_and_workspace():
    """Split counts, tile sizes and the merge (second launch or in-kernel by the last split)
    change nothing; a preallocated workspace and an ``out`` view with odd strides are
    honoured; a seq_len-0 padding row gives zeros."""
    page = 16
    seq_lens = [200, 0, 45]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.float32, "NHD", seed=4)
    sel = _random_selection(seq_lens, page, 2, 6, seed=5)
    q, k, v, bt, sl, sel = _dev(q, k, v, bt, sl, sel)
    ws = DecodeWorkspace(8, q.shape[1], 64, max_splits=16, device=DEVICE)
    base = sparse_decode(q, k, v, bt, sl, sel, num_splits=1, block_n=16)
    for splits, block_n, in_kernel in [(5, 16, False), (16, 32, True), (2, 64, False)]:
        store = torch.full((3, q.shape[1], 2 * 64), float("nan"), device=DEVICE)
        out = store[:, :, ::2]  # non-contiguous output view
        sparse_decode(q, k, v, bt, sl, sel, out=out, num_splits=splits, workspace=ws,
                      block_n=block_n, merge_in_kernel=in_kernel)
        torch.testing.assert_close(out.cpu(), base.cpu(), rtol=1e-5, atol=1e-5)
        assert torch.isnan(store[:, :, 1::2]).all()
        assert (ws.counters == 0).all()  # in-kernel merge: counters reset for the next launch
    assert (base[1] == 0).all()
    want = ref_sparse_decode(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), sl.cpu(), sel.cpu())
    torch.testing.assert_close(base.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,page,group", [(torch.float32, 16, 4), (torch.bfloat16, 1, 8)])
def test_select_then_decode_pipeline(dtype, page, group):
    """summaries -> select_pages -> sparse_decode against the reference pipeline; a sequence
    shorter than the budget equals dense attention."""
    num_select, sink, local = 6, 1, 2
    seq_lens = [8 * num_select * page + 5, (num_select - 2) * page + max(1, page // 2)]
    q, k, v, bt, sl = _setup(seq_lens, group, 128, page, dtype, "interleaved", seed=6)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    summ = allocate_page_summaries(k)
    build_page_summaries(k, summ, bt, sl)
    sel = select_pages(q, summ, bt, sl, page, num_select, sink, local)
    out = sparse_decode(q, k, v, bt, sl, sel)
    c = [x.cpu() for x in (q, k, v, bt, sl, summ)]
    want_sel = ref_select_pages(c[0], c[5], c[3], c[4], page, num_select, sink, local)
    assert torch.equal(sel.cpu(), want_sel)
    want = ref_sparse_decode(*c[:5], want_sel)
    _close(out, want, dtype)
    _close(out[1], _dense_ref(*c[:5])[1], dtype)


@pytest.mark.parametrize(
    "dtype,layout,page,group,num_splits,block_n",
    [
        (torch.float32, "NHD", 16, 1, 3, 16),
        (torch.float32, "HND", 1, 4, 5, 16),
        (torch.bfloat16, "interleaved", 16, 8, 4, 32),
        (torch.float16, "NHD", 1, 8, 1, 16),
    ],
)
def test_dense_sentinel_rows(dtype, layout, page, group, num_splits, block_n):
    """Rows ``[DENSE_ROW, -1, ...]`` read every page of their sequence (more pages than the
    row has slots), beside list rows of the same batch -- per (sequence, KV head), so one
    head of a sequence may be dense and the other listed; splits partition the dense rows'
    tiles. Equal to the reference, and dense rows to dense attention."""
    num_select = 3
    # dense rows of 2x, 1x + 1 token, 5x the budget; a list row; a sequence in both modes
    seq_lens = [2 * num_select * page + 3, num_select * page + 1, 5 * num_select * page,
                (3 * num_select + 1) * page, 4 * num_select * page - 2]
    q, k, v, bt, sl = _setup(seq_lens, group, 64, page, dtype, layout, seed=7)
    sel = _random_selection(seq_lens, page, 2, num_select, seed=8)
    dense_rows = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (4, 1)]
    for b, h in dense_rows:
        sel[b, h] = -1
        sel[b, h, 0] = DENSE_ROW
    out = sparse_decode(*_dev(q, k, v, bt, sl, sel), num_splits=num_splits, block_n=block_n)
    want = ref_sparse_decode(q, k, v, bt, sl, sel)
    _close(out, want, dtype)
    dense = _dense_ref(q, k, v, bt, sl)
    _close(out[:3], dense[:3], dtype)
    g = group
    _close(out[4, g:], dense[4, g:], dtype)  # KV head 1 dense, head 0 listed
    # the listed rows really differ from dense attention (a kernel reading every page of
    # every row, or none of a dense row, would not pass)
    assert (want[3] - dense[3]).abs().max() > 10 * TOL[dtype]
    assert (want[4, :g] - dense[4, :g]).abs().max() > 10 * TOL[dtype]


def test_dense_sentinel_rows_from_select_pages():
    """select_pages(dense_pages=...) -> sparse_decode: dense rows equal dense attention,
    sparse rows the reference over their selection."""
    page, num_select, sink, local, dense_pages = 16, 4, 1, 1, 9
    seq_lens = [9 * page, 5 * page - 3, 20 * page + 1, 2 * page]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.float32, "NHD", seed=9)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    summ = allocate_page_summaries(k)
    build_page_summaries(k, summ, bt, sl)
    sel = select_pages(q, summ, bt, sl, page, num_select, sink, local, dense_pages=dense_pages)
    assert sel[:2, :, 0].eq(DENSE_ROW).all() and not sel[2:, :, 0].eq(DENSE_ROW).any()
    out = sparse_decode(q, k, v, bt, sl, sel, num_splits=2, block_n=16)
    c = [x.cpu() for x in (q, k, v, bt, sl)]
    _close(out, ref_sparse_decode(*c, sel.cpu()), torch.float32)
    dense = _dense_ref(*c)
    _close(out[:2], dense[:2], torch.float32)
    _close(out[3], dense[3], torch.float32)  # shorter than the budget: every page listed
    assert (out[2].cpu() - dense[2]).abs().max() > 1e-3  # the long one really was sparse


def test_default_launch_shape(monkeypatch):
    """The split heuristic on a 132-SM device (host ints only): 32-token tiles; about four
    waves of programs at small grids, about 32 at large ones (the H200 sweep's best at batch
    16 x 8 KV heads was 33 splits), never more splits than tiles or MAX_SPLITS."""
    from sparse_kernels import sparse_decode as sd

    monkeypatch.setattr(sd, "_device_sms", lambda device: 132)
    dev = torch.device("cpu")
    assert {sd.default_block_n(b, 8, dev) for b in (1, 4, 16, 256)} == {32}
    assert sd.default_num_splits(1, 8, 4096, dev, 32) == 64  # 4 waves: 66, capped at 64
    assert sd.default_num_splits(8, 8, 4096, dev, 32) == 9
    assert sd.default_num_splits(16, 8, 4096, dev, 32) == 33
    assert sd.default_num_splits(16, 8, 8192, dev, 32) == 33
    assert sd.default_num_splits(64, 8, 4096, dev, 32) == 9
    assert sd.default_num_splits(16, 8, 128, dev, 32) == 4  # only 4 tiles


@pytest.mark.parametrize("dtype,page,full_pages,num_splits", [
    (torch.float32, 16, 4, 3), (torch.bfloat16, 1, 40, None)])
def test_row_filters_split_the_batch(dtype, page, full_pages, num_splits):
    """``row_filter="full"`` writes exactly the sequences of at most ``full_pages`` pages,
    ``"select"`` exactly the others; one call of each (merges included) equals one ``"all"``
    call, and a row of the other kind is left as it was (NaN here) by each."""
    num_select = 3
    seq_lens = [full_pages * page, full_pages * page + 1, 1, 0, 7 * full_pages * page + 5]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, dtype, "NHD", seed=20)
    sel = _random_selection(seq_lens, page, 2, num_select, seed=21)
    for b, s in enumerate(seq_lens):  # rows of at most full_pages pages read every page
        if -(-s // page) <= full_pages:
            sel[b] = -1
            sel[b, :, 0] = DENSE_ROW
    q, k, v, bt, sl, sel = _dev(q, k, v, bt, sl, sel)
    full = [-(-s // page) <= full_pages for s in seq_lens]
    ws = DecodeWorkspace(len(seq_lens), q.shape[1], 64, device=DEVICE)
    want = sparse_decode(q, k, v, bt, sl, sel, num_splits=num_splits, block_n=16)
    outs = {}
    for kind, selection in (("full", None), ("select", sel)):
        out = torch.full_like(q, float("nan"))
        sparse_decode(q, k, v, bt, sl, selection, out=out, num_splits=num_splits, block_n=16,
                      workspace=ws, row_filter=kind, full_pages=full_pages)
        mine = torch.tensor(full if kind == "full" else [not f for f in full])
        assert not torch.isnan(out[mine.to(DEVICE)]).any()
        assert torch.isnan(out[(~mine).to(DEVICE)]).all(), kind
        outs[kind] = out
    both = torch.where(torch.isnan(outs["full"]), outs["select"], outs["full"])
    _close(both, want, dtype)
    c = [x.cpu() for x in (q, k, v, bt, sl)]
    _close(both, ref_sparse_decode(*c, sel.cpu()), dtype)
    with pytest.raises(ValueError, match="row_filter"):
        sparse_decode(q, k, v, bt, sl, sel, row_filter="short")


@pytest.mark.parametrize("min_split_tiles", [2, 5, 100])
def test_min_split_tiles(min_split_tiles):
    """A row's splits take at least ``min_split_tiles`` tiles (the grid's other splits stay
    empty): the result is unchanged, whether the merge is a second launch or in-kernel."""
    page = 16
    seq_lens = [300, 17, 0, 129]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.float32, "HND", seed=22)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    ws = DecodeWorkspace(4, q.shape[1], 64, max_splits=16, device=DEVICE)
    want = _dense_ref(*[x.cpu() for x in (q, k, v, bt, sl)])
    for in_kernel in (False, True):
        # NaN partials: the merge must read only the splits that were written (empty splits
        # write none with the second-launch merge)
        ws.partial_out.fill_(float("nan"))
        ws.partial_lse.fill_(float("nan"))
        out = sparse_decode(q, k, v, bt, sl, None, num_splits=8, block_n=16, workspace=ws,
                            min_split_tiles=min_split_tiles, merge_in_kernel=in_kernel)
        _close(out, want, torch.float32)
        assert (ws.counters == 0).all()
    # sparse mode: list rows (of num_select pages) and dense rows split as their slots say
    sel = _random_selection(seq_lens, page, 2, 4, seed=23)
    sel[3] = -1
    sel[3, :, 0] = DENSE_ROW
    sel = sel.to(DEVICE)
    ws.partial_out.fill_(float("nan"))
    ws.partial_lse.fill_(float("nan"))
    out = sparse_decode(q, k, v, bt, sl, sel, num_splits=8, block_n=16, workspace=ws,
                        min_split_tiles=min_split_tiles)
    _close(out, ref_sparse_decode(*[x.cpu() for x in (q, k, v, bt, sl, sel)]), torch.float32)
    if min_split_tiles == 100:  # one split per row: the other seven wrote nothing
        assert torch.isnan(ws.partial_lse[:, :, 1:]).all()


@pytest.mark.parametrize("in_kernel", [False, True])
def test_bf16_partials_match_dense(in_kernel):
    """Split partial outputs stored in bf16 (a workspace's partial_dtype): a bf16 cache's
    decode over many splits still matches dense attention to bf16 tolerance."""
    page = 16
    seq_lens = [700, 33, 0, 1000]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.bfloat16, "NHD", seed=26)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    ws = DecodeWorkspace(4, q.shape[1], 64, max_splits=16, device=DEVICE,
                         partial_dtype=torch.bfloat16)
    assert ws.partial_out.dtype == torch.bfloat16 and ws.partial_lse.dtype == torch.float32
    ws.partial_out.fill_(float("nan"))
    out = sparse_decode(q, k, v, bt, sl, None, num_splits=16, block_n=16, workspace=ws,
                        merge_in_kernel=in_kernel)
    _close(out, _dense_ref(*[x.cpu() for x in (q, k, v, bt, sl)]), torch.bfloat16)


def test_full_rows_min_split_tiles_on_large_grids(monkeypatch):
    """FULL_ROWS_MIN_SPLIT_TILES: the full rows' launch on a large grid (4 SMs counted, as on
    the CPU, on a GPU too) fills fewer, longer splits; rows of the other kind and a small grid
    are unchanged."""
    from sparse_kernels import sparse_decode as sd

    monkeypatch.setattr(sd, "_device_sms", lambda device: 4)
    page = 16
    seq_lens = [300, 17, 0, 129, 64, 400]  # the last: 25 pages, not a full row
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.float32, "NHD", seed=24)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    ws = DecodeWorkspace(len(seq_lens), q.shape[1], 64, max_splits=16, device=DEVICE)
    monkeypatch.setattr(sd, "FULL_ROWS_MIN_SPLIT_TILES", 6)
    ws.partial_out.fill_(float("nan"))
    ws.partial_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, k, v, bt, sl, None, out=out, num_splits=8, block_n=16, workspace=ws,
                  row_filter="full", full_pages=20)
    full = torch.tensor([-(-s // page) <= 20 for s in seq_lens], device=DEVICE)
    want = _dense_ref(*[x.cpu() for x in (q, k, v, bt, sl)])
    _close(out[full], want[full.cpu()].to(out.device), torch.float32)
    assert torch.isnan(out[~full]).all()
    # 300 tokens = 19 tiles of 16: splits of at least 6 tiles -> 4 of the 8 written
    assert not torch.isnan(ws.partial_lse[0, :, :4]).any()
    assert torch.isnan(ws.partial_lse[0, :, 4:]).all()

"""Prefill estimators (streaming, XAttention, vertical-slash, FlexPrefill) against references.

Runs under TRITON_INTERPRET=1 at small sizes: ragged batches of chunks with prefixes already in
the paged cache, unaligned chunk starts, GQA groups 1/4/7/8, page sizes 1/16/64, all layouts.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def paged_to_device(k, v, layout):
    return reference.paged_to_device(k, v, layout, DEVICE)


from sparse_kernels import reference  # noqa: E402

from sparse_kernels.block_select import build_block_lists  # noqa: E402
from sparse_kernels.block_sparse_prefill import (  # noqa: E402
    PrefillBlockLists,
    block_sparse_prefill_attention,
    prefill_block_metadata,
)
from sparse_kernels.estimate_flexprefill import estimate_flexprefill, flexprefill_parts  # noqa: E402
from sparse_kernels.estimate_streaming import estimate_streaming  # noqa: E402
from sparse_kernels.estimate_vertical_slash import (  # noqa: E402
    estimate_vertical_slash,
    slash_index_bands,
    vertical_index_blocks,
    vertical_slash_indices,
    vs_select_blocks,
)
from sparse_kernels.estimate_xattention import (  # noqa: E402
    estimate_xattention,
    xattention_block_scores,
)
from sparse_kernels.last_q_scores import last_q_score_planes, last_q_scores  # noqa: E402
from sparse_kernels.mass_cut import cover_counts, cover_counts_reference  # noqa: E402
from sparse_kernels.radix_select import (  # noqa: E402
    radix_keep_mask,
    radix_select_cut,
    topk_keep_reference,
)
from sparse_kernels.reference import dense_attention, random_paged_kv  # noqa: E402
from sparse_kernels.reference_prefill import (  # noqa: E402
    lists_to_mask,
    ref_flexprefill_mask,
    ref_flexprefill_parts,
    ref_last_q_scores,
    ref_select_by_mass,
    ref_streaming_mask,
    ref_vs_mask_from_indices,
    ref_xattention_scores,
)

# name -> (seq_lens, q_lens); every chunk has a prefix in the cache, starts are unaligned.
BATCHES = {
    "ragged3": ([100, 37, 64], [45, 37, 20]),
    "prefix_long": ([150, 21], [33, 18]),
    "long1": ([200], [70]),
    # chunks shorter than a block, one of a single token, the last one at the end of q
    "short_tail": ([200, 70, 150], [1, 70, 17]),
    # several 64-key tiles per sequence (last_q_scores' spans of tiles)
    "multi_span": ([700, 260, 450], [40, 30, 1]),
    # last_q_scores with 16 last queries and 16-key tiles: a tile ends one key past the first
    # of them (142, 78) or exactly on it (143)
    "mask_edges": ([142, 143, 78], [20, 16, 30]),
}


def make_batch(batch, hkv, group, head_dim, page, layout="NHD", dtype=torch.float32, seed=0,
               structured=False):
    seq_lens, q_lens = BATCHES[batch]
    g = torch.Generator().manual_seed(seed)
    k, v, bt = random_paged_kv(seq_lens, hkv, head_dim, page, dtype=dtype, layout=layout,
                               generator=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * group, head_dim, generator=g)
    if structured:  # peaky attention so that selections are not near-uniform
        q = q * 2.0
    k, v = paged_to_device(k, v, layout)
    return q.to(dtype).to(DEVICE), k, v, bt.to(DEVICE), qsl.to(DEVICE), sl.to(DEVICE)


def check_lists(lists: PrefillBlockLists, meta, hkv):
    """Causal, ascending, duplicate-free, diagonal and first block always there."""
    assert isinstance(lists.density, torch.Tensor) and lists.density.device == lists.block_count.device
    idx, cnt = lists.block_idx.cpu(), lists.block_count.cpu()
    seqs, idxs = meta.q_block_seq.cpu(), meta.q_block_idx.cpu()
    assert idx.shape == (meta.num_q_blocks, hkv, meta.max_kv_blocks)
    assert cnt.shape == (meta.num_q_blocks, hkv)
    causal = 0
    for s in range(meta.num_q_blocks):
        b, i = int(seqs[s]), int(idxs[s])
        if b < 0:
            assert (cnt[s] == 0).all()
            continue
        causal += (i + 1) * hkv
        for h in range(hkv):
            c = int(cnt[s, h])
            sel = idx[s, h, :c].tolist()
            assert 1 <= c <= i + 1
            assert sel == sorted(set(sel)), sel
            assert sel[0] == 0 and sel[-1] == i, (s, h, sel)
    assert float(lists.density) == pytest.approx(float(cnt.sum()) / causal, rel=1e-6)


def check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, hkv):
    """Full density, and the sparse kernel with these lists equals dense attention."""
    assert float(lists.density) == pytest.approx(1.0)
    out = block_sparse_prefill_attention(q, k, v, bt, meta, lists.block_idx, lists.block_count)
    ref = dense_attention(q, k, v, bt, qsl, sl)
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max().item() < tol


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "batch,hkv,bs,sink,local",
    [("ragged3", 2, 16, 16, 20), ("prefix_long", 3, 16, 40, 0), ("long1", 1, 32, 1, 64),
     ("ragged3", 1, 64, 0, 1)],
)
def test_streaming_equals_reference(batch, hkv, bs, sink, local):
    seq_lens, q_lens = BATCHES[batch]
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    meta = prefill_block_metadata(qsl.to(DEVICE), sl.to(DEVICE), bs)
    lists = estimate_streaming(meta, hkv, sink_tokens=sink, local_tokens=local)
    check_lists(lists, meta, hkv)
    got = lists_to_mask(lists.block_idx, lists.block_count, meta.max_kv_blocks)
    ref = ref_streaming_mask(qsl, sl, hkv, bs, sink, local, meta.num_q_blocks, meta.max_kv_blocks)
    assert torch.equal(got, ref)


def test_streaming_full_window_equals_dense():
    q, k, v, bt, qsl, sl = make_batch("ragged3", 2, 4, 64, 16, "HND")
    meta = prefill_block_metadata(qsl, sl, 16)
    lists = estimate_streaming(meta, 2, sink_tokens=0, local_tokens=10_000)
    check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, 2)


# ----------------------------------------------------------------------------- xattention


@pytest.mark.parametrize(
    "batch,hkv,group,head_dim,page,layout,dtype,bs,stride,thr",
    [
        ("ragged3", 2, 4, 64, 16, "NHD", torch.float32, 16, 4, 0.5),
        ("prefix_long", 1, 7, 64, 1, "interleaved", torch.float32, 32, 8, 0.3),
        ("long1", 1, 1, 128, 64, "HND", torch.float32, 16, 16, 0.6),
        ("ragged3", 1, 8, 64, 16, "HND", torch.bfloat16, 16, 8, 0.4),
    ],
)
def test_xattention_scores_and_selection(batch, hkv, group, head_dim, page, layout, dtype, bs,
                                         stride, thr):
    q, k, v, bt, qsl, sl = make_batch(batch, hkv, group, head_dim, page, layout, dtype)
    meta = prefill_block_metadata(qsl, sl, bs)
    scores = xattention_block_scores(q, k, bt, meta, stride=stride)
    ref = ref_xattention_scores(q, k, v, bt, qsl, sl, bs, stride, meta.num_q_blocks,
                                meta.max_kv_blocks)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert (scores.cpu() - ref).abs().max().item() < tol
    lists = estimate_xattention(q, k, bt, meta, threshold=thr, stride=stride)
    check_lists(lists, meta, hkv)
    got = lists_to_mask(lists.block_idx, lists.block_count, meta.max_kv_blocks)
    want = ref_select_by_mass(scores, qsl, sl, bs, hkv, thr)
    assert torch.equal(got, want)
    assert float(lists.density) < 1.0


@pytest.mark.parametrize("logits", [False, True])
def test_mass_selection_single_and_chunked_rows(logits):
    """build_block_lists' mass rule, with the row in one register tile and in 16-block chunks,
    on probabilities and on logits, against the sort-based reference."""
    qsl = torch.tensor([0, 40, 70], dtype=torch.int32, device=DEVICE)
    sl = torch.tensor([300, 90], dtype=torch.int32, device=DEVICE)
    meta = prefill_block_metadata(qsl, sl, 16)  # up to 19 key blocks
    hkv, group = 2, 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(meta.num_q_blocks, hkv * group, meta.max_kv_blocks, generator=g) * 2.0
    causal = (torch.arange(meta.max_kv_blocks)[None, :] <= meta.q_block_idx.cpu()[:, None].long())
    probs = torch.softmax(x.masked_fill(~causal[:, None, :], float("-inf")), -1)
    on = torch.tensor([[True, False, True, True, True, False], [True] * 6])
    want = ref_select_by_mass(probs, qsl, sl, 16, hkv, 0.7, rows_on=on)
    for max_block_k in (4096, 16):
        lists = build_block_lists(meta, hkv, scores=(x if logits else probs).to(DEVICE),
                                  scores_are_logits=logits, score_rows_on=on.to(DEVICE),
                                  threshold=0.7,
                                  max_block_k=max_block_k * group)
        check_lists(lists, meta, hkv)
        got = lists_to_mask(lists.block_idx, lists.block_count, meta.max_kv_blocks)
        assert torch.equal(got, want), max_block_k


def test_xattention_threshold_one_is_dense():
    q, k, v, bt, qsl, sl = make_batch("prefix_long", 1, 4, 64, 16, "interleaved")
    meta = prefill_block_metadata(qsl, sl, 16)
    lists = estimate_xattention(q, k, bt, meta, threshold=1.0, stride=4)
    check_lists(lists, meta, 1)
    check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, 1)


# ----------------------------------------------------------------------------- vertical-slash


@pytest.mark.parametrize(
    "batch,hkv,group,head_dim,page,layout,bs,last_q,nv,ns",
    [
        ("ragged3", 2, 4, 64, 16, "interleaved", 16, 24, 10, 6),
        ("prefix_long", 1, 7, 64, 64, "NHD", 16, 16, 20, 3),
        ("long1", 1, 1, 128, 1, "HND", 32, 40, 8, 8),
    ],
)
def test_vertical_slash_scores_and_blocks(batch, hkv, group, head_dim, page, layout, bs, last_q,
                                          nv, ns):
    q, k, v, bt, qsl, sl = make_batch(batch, hkv, group, head_dim, page, layout)
    meta = prefill_block_metadata(qsl, sl, bs)
    vert, slash = last_q_scores(q, k, bt, meta, last_q=last_q)
    width = meta.max_kv_blocks * bs
    vr, sr = ref_last_q_scores(q, k, v, bt, qsl, sl, last_q, width)
    vert, slash = vert.cpu(), slash.cpu()
    assert (vert - vr).abs().max().item() < 1e-6
    assert (slash - sr).abs().max().item() < 1e-6
    v_idx, s_idx = vertical_slash_indices(vert, slash, sl.cpu(), nv, ns)
    # indices are the top entries of the (reference) scores
    for b in range(len(sl)):
        L = int(sl[b])
        for h in range(q.shape[1]):
            kv_ = min(nv, L)
            assert set(v_idx[b, h, :kv_].tolist()) == set(torch.topk(vr[b, h, :L], kv_).indices.tolist())
    lists = estimate_vertical_slash(q, k, bt, meta, last_q=last_q, n_vertical=nv, n_slash=ns)
    check_lists(lists, meta, hkv)
    got = lists_to_mask(lists.block_idx, lists.block_count, meta.max_kv_blocks)
    want = ref_vs_mask_from_indices(qsl, sl, bs, hkv, v_idx, s_idx, meta.num_q_blocks,
                                    meta.max_kv_blocks)
    assert torch.equal(got, want)


@pytest.mark.parametrize("tiles", [1, 2, 3, 8])
@pytest.mark.parametrize("batch,page,layout", [("ragged3", 16, "NHD"),
                                               ("multi_span", 64, "interleaved")])
def test_last_q_scores_over_spans_of_tiles(tiles, batch, page, layout):
    """Programs that attend several key tiles each (an online log-sum-exp over their span in
    pass 1) give the one-tile scores: spans that end past a sequence, ragged lengths, spans
    of a tile count that does not divide the tiles."""
    q, k, v, bt, qsl, sl = make_batch(batch, 2, 4, 64, page, layout)
    meta = prefill_block_metadata(qsl, sl, 16)
    width = meta.max_kv_blocks * 16
    vr, sr = ref_last_q_scores(q, k, v, bt, qsl, sl, 24, width)
    vert, slash = last_q_scores(q, k, bt, meta, last_q=24, tiles=tiles)
    assert (vert.cpu() - vr).abs().max().item() < 1e-6
    assert (slash.cpu() - sr).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    "group,hpp,block_n,last_q,warps",
    [
        (4, 1, 64, 24, 4),  # one head per program, two wrap classes
        (4, 4, 64, 24, 4),  # the whole GQA group in one program
        (7, 2, 32, 24, 4),  # a group that the head count does not divide: masked heads
        (7, 8, 16, 40, 8),  # more heads per program than the group; 64 rows over 16 columns
        (1, 4, 16, 24, 4),  # no GQA: three of four heads masked
        (8, 2, 128, 64, 4),  # a tile wider than every chunk here
        # last_q a power of 2 that chunks reach: tiles before the first query skip the masks
        (4, 2, 16, 16, 4),
        (7, 4, 32, 16, 4),
    ],
)
@pytest.mark.parametrize("batch", ["short_tail", "mask_edges"])
def test_last_q_scores_head_groups_and_wrap_classes(group, hpp, block_n, last_q, warps, batch):
    """Programs over several query heads of one GQA group, and key tiles narrower than the
    queries (the cyclic skew wraps up to four times) or wider than the sequences, equal the
    reference; ragged chunks include one of a single token, and tiles that end one key past
    the first of the last queries (which must keep the causal mask) or exactly on it."""
    q, k, v, bt, qsl, sl = make_batch(batch, 1, group, 64, 16, "HND")
    meta = prefill_block_metadata(qsl, sl, 16)
    width = meta.max_kv_blocks * 16
    vr, sr = ref_last_q_scores(q, k, v, bt, qsl, sl, last_q, width)
    vert, slash = last_q_scores(q, k, bt, meta, last_q=last_q, heads_per_program=hpp,
                                block_n=block_n, num_warps=warps)
    assert (vert.cpu() - vr).abs().max().item() < 1e-6
    assert (slash.cpu() - sr).abs().max().item() < 1e-6


def test_last_q_scores_rejects_bad_launch_settings():
    q, k, v, bt, qsl, sl = make_batch("ragged3", 1, 4, 64, 16)
    meta = prefill_block_metadata(qsl, sl, 16)
    for kw in ({"tiles": 0}, {"num_stages": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            last_q_scores(q, k, bt, meta, last_q=8, **kw)
    with pytest.raises(ValueError, match="power of 2"):
        last_q_scores(q, k, bt, meta, last_q=8, heads_per_program=3)
    with pytest.raises(ValueError, match="block_n"):
        last_q_scores(q, k, bt, meta, last_q=8, block_n=48)


def tie_heavy_rows(n_p, n_r, width, seed):
    """Scores with what a top-k must get right: runs of equal values across chunk edges, few
    distinct values (ties at the cut), zeros, -0.0 (a zero), negatives (never candidates), and
    values spread over many exponents (the top digits differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_p, n_r, width, generator=g) ** 8
    x[0, 0, 10:60] = 0.5  # a tie run over several 16-entry chunks
    x[-1, 1] = torch.randint(0, 4, (width,), generator=g).float() / 4  # four values only
    x[0, 2, ::3] = 0.0
    x[0, 2, 1::3] = -0.0
    x[-1, 3, ::2] = -torch.rand(width - width // 2, generator=g)
    return x


@pytest.mark.parametrize("chunk,digit_bits", [(16, 8), (64, 11), (32, 5)])
@pytest.mark.parametrize("k", [(5, 9), (0, 1), (10**6, 40)])
def test_radix_select_cut_is_the_stable_top_k(chunk, digit_bits, k):
    """Each row's cut (k-th largest value, ties to take) keeps exactly the entries a stable
    descending sort ranks below k: ragged lengths (one row empty, one past a chunk edge), k
    of 0 and above the candidate count, ties at the cut, zeros and negatives."""
    width = 150
    x = tie_heavy_rows(2, 6, width, 0)
    lengths = torch.tensor([150, 17, 0], dtype=torch.int32)
    cut = radix_select_cut(x.to(DEVICE), lengths.to(DEVICE), 2, k, chunk=chunk,
                           digit_bits=digit_bits)
    want = topk_keep_reference(x, lengths, 2, k)
    state = cut.state.cpu()
    for p in range(2):
        for r in range(6):
            n = int(lengths[r // 2])
            row = x[p, r, :n]
            key = torch.where(row == 0, 0, row.view(torch.int32))
            t, take_eq, all_eq = (int(v) for v in state[p, r])
            keep = torch.zeros(width, dtype=torch.bool)
            keep[:n] = (key > t) & (row >= 0)
            keep[(key == t).nonzero().flatten()[:take_eq]] = True
            assert torch.equal(keep, want[p, r]), (p, r, t, take_eq)
            assert int(keep.sum()) == min(k[p], int((row >= 0).sum()))
            if take_eq:
                assert all_eq == int(((key == t) & (row >= 0)).sum())


def test_radix_keep_mask_with_a_k_per_row():
    """A k per row (an int32 device tensor, as FlexPrefill's budgets): the keep mask equals a
    stable sort's top k of each row, over ragged rows, ties, zeros and negatives, k = 0 and k
    above the row; nothing past a row's length is kept."""
    width = 150
    x = tie_heavy_rows(2, 6, width, 3)
    lengths = torch.tensor([150, 17, 0], dtype=torch.int32)
    k = torch.tensor([[5, 0, 200, 3, 1, 7], [40, 9, 1, 0, 2, 150]], dtype=torch.int32)
    cut = radix_select_cut(x.to(DEVICE), lengths.to(DEVICE), 2, k.to(DEVICE), chunk=32,
                           digit_bits=5)
    got = radix_keep_mask(x.to(DEVICE), lengths.to(DEVICE), 2, cut).cpu()
    want = topk_keep_reference(x, lengths, 2, k)
    assert torch.equal(got.bool(), want)
    assert int(got[0, 0].sum()) == 5 and int(got[1, 0].sum()) == 40 and int(got[0, 1].sum()) == 0
    with pytest.raises(ValueError, match="per-row k"):
        radix_select_cut(x.to(DEVICE), lengths.to(DEVICE), 2, k[:, :3].to(DEVICE))


def dyadic_rows(n_p, n_r, width, seed):
    """Non-negative rows of multiples of 2**-20 below 2**-8 (every partial sum exact in fp32),
    with what a mass cut must get right: runs of equal values (ties at the cut) across chunk
    edges, zeros, a row of few distinct values, values over many exponents."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 1 << 12, (n_p, n_r, width), generator=g) ** 2 >> 12).float()
    x[0, 0, 10:60] = 2048.0  # a tie run over several chunks
    x[-1, 1] = (torch.randint(0, 4, (width,), generator=g) * 512).float()
    x[0, 2, ::3] = 0.0
    x[-1, 3, :100] = 1.0  # many tiny equal values after a few large ones
    x[-1, 3, 100:105] = 4000.0
    return x * 2.0 ** -20


@pytest.mark.parametrize("chunk,digit_bits", [(16, 4), (32, 3), (64, 8)])
@pytest.mark.parametrize("block_size", [1, 4])
def test_cover_counts_equal_sort_and_cumsum(chunk, digit_bits, block_size):
    """FlexPrefill's budget (largest entries whose cumulative mass stays <= gamma, + 1, in
    blocks) equals the sort-and-cumsum reference: ragged rows (one empty), ties at the cut,
    gamma above a row's mass (whole row), below its largest entry, and exactly on a prefix sum
    (<= keeps it)."""
    width = 150
    x = dyadic_rows(2, 6, width, 0)
    lengths = torch.tensor([150, 61, 0], dtype=torch.int32)
    totals = [float(x[p, r, :int(lengths[r // 2])].sum()) for p in range(2) for r in range(6)]
    srt = torch.sort(x[0, 0], descending=True).values
    assert srt[10] > srt[11] and srt[70] == srt[71]
    on_prefix = float(torch.cumsum(srt, 0)[10])  # exact (dyadic), the next value is smaller
    in_ties = float(torch.cumsum(srt, 0)[70])  # inside a run of equal values
    for gamma in (0.3 * max(totals), on_prefix, in_ties, 1e-9, 2.0 * max(totals)):
        got = cover_counts(x.to(DEVICE), lengths.to(DEVICE), 2, gamma, block_size, chunk=chunk,
                           digit_bits=digit_bits).cpu()
        want = cover_counts_reference(x, lengths, 2, gamma, block_size)
        assert torch.equal(got, want), (gamma, got, want)
    # a budget that is not the whole row somewhere, so the test can tell the rules apart
    for gamma, n in ((on_prefix, 13), (in_ties, 73)):
        got = cover_counts(x.to(DEVICE), lengths.to(DEVICE), 2, gamma, 1, chunk=chunk,
                           digit_bits=digit_bits).cpu()
        assert int(got[0, 0]) == n  # n - 2 entries within gamma, + 1, + 1 (FlexPrefill's rule)


@pytest.mark.parametrize("nv,ns", [(5, 9), (300, 1), (1, 2000), (0, 4)])
def test_vs_select_blocks_equal_the_torch_path(nv, ns):
    """The radix select's block maps equal the torch path's (stable sort, then the
    conversions): ragged rows, ties at the cut across chunk edges (lowest index first), the
    last block (whose next band is past the table), budgets of 0 and above the row."""
    b, h, bs, nkb = 3, 2, 16, 12
    width = nkb * bs
    x = tie_heavy_rows(2, b * h, width, 1).clamp(min=0.0).view(2, b, h, width)
    # rows whose cut falls in a run of equal values, one per block and chunk: each tie taken
    # or not is a block (or band) of its own
    x[:, 0, 1] = 0.0
    x[:, 0, 1, ::bs] = 0.5
    x[:, 0, 1, 40] = 0.7
    sl = torch.tensor([192, 100, 33], dtype=torch.int32)
    vb, sb = vs_select_blocks(x.to(DEVICE), sl.to(DEVICE), nv, ns, bs, nkb, chunk=32)
    v_idx, s_idx = vertical_slash_indices(x[0], x[1], sl, nv, ns)
    assert torch.equal(vb.cpu(), vertical_index_blocks(v_idx, bs, nkb))
    assert torch.equal(sb.cpu(), slash_index_bands(s_idx, bs, nkb))
    assert int(vb.sum()) > 0 if nv > 0 else int(vb.sum()) == 0


@pytest.mark.parametrize("layout", ["NHD", "HND", "interleaved"])
def test_last_q_pass1_writes_block_mean_keys(layout):
    """Pass 1 of the last queries' scores fills the block-mean keys as block_mean_keys does
    (FlexPrefill's fused path): several 64-key blocks per sequence, a partial last block; the
    scores are unchanged by it."""
    from sparse_kernels.estimate_flexprefill import block_mean_keys

    q, k, v, bt, qsl, sl = make_batch("multi_span", 2, 4, 64, 16, layout)
    meta = prefill_block_metadata(qsl, sl, 64)
    kbar = torch.zeros(meta.batch_size, 2, meta.max_kv_blocks, 64, device=q.device)
    planes = last_q_score_planes(q, k, bt, meta, last_q=64, block_mean_keys=kbar)
    want = block_mean_keys(k, bt, meta)
    assert (kbar - want).abs().max().item() < 1e-5
    assert torch.equal(planes, last_q_score_planes(q, k, bt, meta, last_q=64))
    with pytest.raises(ValueError, match="block mean keys"):
        last_q_score_planes(q, k, bt, meta, last_q=64, block_n=32, block_mean_keys=kbar)


def test_last_q_score_planes_are_last_q_scores():
    q, k, v, bt, qsl, sl = make_batch("multi_span", 1, 4, 64, 16, "NHD")
    meta = prefill_block_metadata(qsl, sl, 16)
    planes = last_q_score_planes(q, k, bt, meta, last_q=24)
    vr, sr = ref_last_q_scores(q, k, v, bt, qsl, sl, 24, meta.max_kv_blocks * 16)
    assert planes.shape[0] == 2 and planes.is_contiguous()
    assert (planes[0].cpu() - vr).abs().max().item() < 1e-6
    assert (planes[1].cpu() - sr).abs().max().item() < 1e-6


def test_vertical_slash_conversion_rules():
    """A column selects its block; a diagonal selects offset d//B and, if d%B>0, d//B+1."""
    v_idx = torch.tensor([[[0, 17, 63, -1]]])
    s_idx = torch.tensor([[[0, 16, 17, 40, -1]]])
    vb = vertical_index_blocks(v_idx, 16, 5)
    sb = slash_index_bands(s_idx, 16, 5)
    assert vb[0, 0].tolist() == [1, 1, 0, 1, 0]
    assert sb[0, 0].tolist() == [1, 1, 1, 1, 0]


def test_vertical_slash_huge_budget_is_dense():
    q, k, v, bt, qsl, sl = make_batch("ragged3", 1, 4, 64, 16, "NHD", torch.bfloat16)
    meta = prefill_block_metadata(qsl, sl, 16)
    lists = estimate_vertical_slash(q, k, bt, meta, last_q=16, n_vertical=10**6, n_slash=10**6)
    check_lists(lists, meta, 1)
    check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, 1)


# ----------------------------------------------------------------------------- flexprefill


@pytest.mark.parametrize(
    "batch,hkv,group,head_dim,page,layout,bs,gamma,tau",
    [
        ("ragged3", 2, 4, 64, 16, "NHD", 16, 0.6, 0.0),  # all vertical-slash heads
        ("prefix_long", 1, 7, 64, 1, "interleaved", 16, 0.6, 10.0),  # all query-aware
        ("long1", 1, 8, 128, 64, "HND", 32, 0.8, "median"),  # mixed
        # the batch's last chunk (20 queries) is shorter than a block: its query mean reads
        # only those rows (the gather once ran past the end of q)
        ("ragged3", 2, 4, 64, 16, "NHD", 32, 0.6, "median"),
        # 64-token blocks: the block-mean keys come from the last queries' pass 1
        ("multi_span", 1, 4, 64, 16, "HND", 64, 0.7, "median"),
    ],
)
def test_flexprefill_matches_reference(batch, hkv, group, head_dim, page, layout, bs, gamma, tau):
    q, k, v, bt, qsl, sl = make_batch(batch, hkv, group, head_dim, page, layout, structured=True)
    meta = prefill_block_metadata(qsl, sl, bs)
    parts = {n: t.cpu() for n, t in flexprefill_parts(q, k, bt, meta, gamma=gamma).items()}
    a_true, a_hat, js, v_blocks, s_bands, qa = ref_flexprefill_parts(q, k, v, bt, qsl, sl, bs,
                                                                     gamma)
    nkb = meta.max_kv_blocks
    assert (parts["a_true"] - a_true).abs().max().item() < 1e-5
    assert (parts["a_hat"] - a_hat).abs().max().item() < 1e-5
    assert (parts["js"] - js).abs().max().item() < 1e-4
    assert torch.equal(parts["v_blocks"].bool(), v_blocks)
    assert torch.equal(parts["s_bands"].bool(), s_bands)
    n = qa.shape[0]
    probs = torch.softmax(parts["logits"][:n].masked_fill(qa[:n] == 0, float("-inf")), -1)
    assert (probs - qa).abs().max().item() < 1e-5
    if tau == "median":
        tau = float(js.median()) + 1e-4
        assert 0 < int((js < tau).sum()) < js.numel()
    lists = estimate_flexprefill(q, k, bt, meta, gamma=gamma, tau=tau)
    check_lists(lists, meta, hkv)
    got = lists_to_mask(lists.block_idx, lists.block_count, nkb)
    want = ref_flexprefill_mask(q, k, v, bt, qsl, sl, bs, gamma, tau, meta.num_q_blocks)
    assert torch.equal(got, want)


@pytest.mark.parametrize("group", [4, 7])
def test_flexprefill_pooled_logits_over_several_key_tiles(monkeypatch, group):
    """Pooled query-aware logits with 16-block key tiles: rows of several tiles, packs of slots
    that span sequences."""
    from sparse_kernels import estimate_flexprefill as ef

    monkeypatch.setattr(ef, "POOLED_BLOCK_J", 16)
    q, k, v, bt, qsl, sl = make_batch("multi_span", 1, group, 64, 16, "NHD", structured=True)
    meta = prefill_block_metadata(qsl, sl, 16)
    assert meta.max_kv_blocks > 2 * 16  # three key tiles
    parts = {n: t.cpu() for n, t in flexprefill_parts(q, k, bt, meta, gamma=0.7).items()}
    qa = ref_flexprefill_parts(q, k, v, bt, qsl, sl, 16, 0.7)[5]
    n = qa.shape[0]
    probs = torch.softmax(parts["logits"][:n].masked_fill(qa[:n] == 0, float("-inf")), -1)
    assert (probs - qa).abs().max().item() < 1e-5


def test_flexprefill_gamma_one_is_dense():
    q, k, v, bt, qsl, sl = make_batch("prefix_long", 2, 4, 64, 16, "HND", torch.bfloat16)
    meta = prefill_block_metadata(qsl, sl, 16)
    for tau in (0.0, 10.0):
        lists = estimate_flexprefill(q, k, bt, meta, gamma=1.0, tau=tau)
        check_lists(lists, meta, 2)
        check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, 2)


# ----------------------------------------------------------------------------- short chunks


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("method", ["streaming", "xattention", "vertical_slash", "flexprefill"])
def test_every_estimator_at_full_density_with_chunks_shorter_than_a_block(method, bs):
    """Chunked prefill ends prompts with chunks of any length: a 1-token chunk and a 17-token
    chunk that ends the batch (FlexPrefill's query gather once ran past the end of q there).
    At settings that keep every block, each estimator's lists give dense attention."""
    hkv, group = 2, 4
    q, k, v, bt, qsl, sl = make_batch("short_tail", hkv, group, 64, 16, "NHD", structured=True)
    meta = prefill_block_metadata(qsl, sl, bs)
    if method == "streaming":
        lists = estimate_streaming(meta, hkv, sink_tokens=bs, local_tokens=10**6)
    elif method == "xattention":
        lists = estimate_xattention(q, k, bt, meta, threshold=1.0, stride=8)
    elif method == "vertical_slash":
        lists = estimate_vertical_slash(q, k, bt, meta, last_q=bs, n_vertical=10**6,
                                        n_slash=10**6)
    else:
        lists = estimate_flexprefill(q, k, bt, meta, gamma=1.0, tau=0.0)
    check_lists(lists, meta, hkv)
    check_dense_equivalent(lists, meta, q, k, v, bt, qsl, sl, hkv)

"""The engine-agnostic steps the adapters run (kernels/pipeline.py), against references."""

import math
import os

import pytest
import torch

from sparse_kernels import reference
from sparse_kernels.block_sparse_prefill import prefill_block_metadata
from sparse_kernels.config import SparseConfig
from sparse_kernels.pipeline import decode_budget_pages, sparse_prefill_attention

HQ, HKV, D, PAGE = 4, 2, 64, 16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def _dev(*xs):
    return [x.to(DEVICE) for x in xs]


def _prefill_case(seed=0):
    seq_lens, q_lens = [160, 96], [96, 96]
    k, v, bt = reference.random_paged_kv(seq_lens, HKV, D, PAGE,
                                         generator=torch.Generator().manual_seed(seed))
    qsl = torch.tensor([0, 96, 192], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(192, HQ, D, generator=torch.Generator().manual_seed(seed + 1))
    meta = prefill_block_metadata(qsl, sl, 16, num_tokens=192, max_seq_len=160)
    return q, k, v, bt, qsl, sl, meta


def _meta_to_device(meta):
    import dataclasses

    return dataclasses.replace(meta, **{
        f.name: getattr(meta, f.name).to(DEVICE) for f in dataclasses.fields(meta)
        if isinstance(getattr(meta, f.name), torch.Tensor)})


@pytest.mark.parametrize("methods, streaming_head", [
    # KV head 1 XAttention at threshold 1.0 (= dense), KV head 0 streaming
    ({None: "xattention", 0: "streaming"}, 0),
    # a head kept dense beside a sparse method (as prefill_selection_study's
    # --head-config-out writes it): KV head 1 dense, KV head 0 the layer's streaming
    ({None: "streaming", 1: "dense"}, 0),
])
def test_per_head_prefill_methods_keep_each_heads_own_lists(methods, streaming_head):
    q, k, v, bt, qsl, sl, meta = _prefill_case()
    cfg = SparseConfig(block_size=16, sink_tokens=16, local_tokens=16, token_budget=64,
                       xattn_threshold=1.0, xattn_stride=4, prefill_dense_above=1.0)
    scale = 1 / math.sqrt(D)
    dense = reference.dense_attention(q, k, v, bt, qsl, sl)
    q, k, v, bt = _dev(q, k, v, bt)
    meta = _meta_to_device(meta)
    out = torch.empty_like(q)
    dens, fell_back = sparse_prefill_attention(methods, cfg, q, k, v, bt, meta, out, scale)
    assert not fell_back
    streaming = torch.empty_like(q)
    sparse_prefill_attention("streaming", cfg, q, k, v, bt, meta, streaming, scale)
    out, streaming = out.cpu(), streaming.cpu()
    g = HQ // HKV
    s_heads = slice(streaming_head * g, (streaming_head + 1) * g)
    d_heads = slice((1 - streaming_head) * g, (2 - streaming_head) * g)
    torch.testing.assert_close(out[:, d_heads], dense[:, d_heads], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out[:, s_heads], streaming[:, s_heads], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(streaming[:, s_heads], dense[:, s_heads], atol=1e-3)
    assert 0.5 < float(dens) < 1.0


@pytest.mark.parametrize("dense_above, expect_fallback", [(0.3, True), (0.9, False), (1.0, False)])
def test_prefill_dense_fallback_above_density(dense_above, expect_fallback):
    """A chunk whose estimated density exceeds prefill_dense_above runs the dense function
    instead of the sparse kernel; below it (or at 1.0) the sparse kernel runs."""
    q, k, v, bt, qsl, sl, meta = _prefill_case()
    cfg = SparseConfig(block_size=16, sink_tokens=16, local_tokens=16, token_budget=64,
                       prefill_dense_above=dense_above)
    scale = 1 / math.sqrt(D)
    dense_out = reference.dense_attention(q, k, v, bt, qsl, sl)
    q, k, v, bt = _dev(q, k, v, bt)
    meta = _meta_to_device(meta)
    out = torch.full_like(q, float("nan"))
    calls = []

    def dense():
        calls.append(1)
        out.copy_(dense_out)

    dens, fell_back = sparse_prefill_attention("streaming", cfg, q, k, v, bt, meta, out, scale,
                                               dense_fallback=dense)
    assert 0.3 < float(dens) < 0.9  # the streaming window keeps part of the blocks here
    assert fell_back is expect_fallback and len(calls) == int(expect_fallback)
    out = out.cpu()
    if expect_fallback:
        torch.testing.assert_close(out, dense_out, atol=1e-6, rtol=1e-6)
    else:
        assert not torch.isnan(out).any()
        assert not torch.allclose(out, dense_out, atol=1e-3)


def test_streaming_local_tokens_sets_the_prefill_window_alone():
    """streaming_local_tokens widens streaming prefill's window without local_tokens (what
    decode always keeps): same output as local_tokens at that width, unlike the default."""
    q, k, v, bt, qsl, sl, meta = _prefill_case()
    kw = dict(block_size=16, sink_tokens=16, token_budget=64, prefill_dense_above=1.0)
    scale = 1 / math.sqrt(D)
    q, k, v, bt = _dev(q, k, v, bt)
    meta = _meta_to_device(meta)
    outs, dens = {}, {}
    for name, cfg in {"narrow": SparseConfig(local_tokens=16, **kw),
                      "wide_local": SparseConfig(local_tokens=48, **kw),
                      "wide_streaming": SparseConfig(local_tokens=16, streaming_local_tokens=48,
                                                     **kw)}.items():
        outs[name] = torch.empty_like(q)
        dens[name], _ = sparse_prefill_attention("streaming", cfg, q, k, v, bt, meta,
                                                 outs[name], scale)
    assert SparseConfig(local_tokens=16, streaming_local_tokens=48, **kw).prefill_local_tokens == 48
    assert SparseConfig(local_tokens=16, **kw).prefill_local_tokens == 16
    torch.testing.assert_close(outs["wide_streaming"], outs["wide_local"], atol=0, rtol=0)
    assert float(dens["wide_streaming"]) == float(dens["wide_local"]) > float(dens["narrow"])
    assert not torch.allclose(outs["wide_streaming"], outs["narrow"], atol=1e-3)


@pytest.mark.parametrize("page, expect", [(16, (256, 4, 32)), (64, (64, 1, 8))])
def test_decode_budget_pages(page, expect):
    cfg = SparseConfig(token_budget=4096, sink_tokens=64, local_tokens=512)
    assert decode_budget_pages(cfg, page) == expect


def test_warm_up_prefill_covers_every_length_bucket():
    from sparse_kernels.pipeline import warm_up_prefill

    k, v, _ = reference.random_paged_kv([64], HKV, D, PAGE)
    cfg = SparseConfig(block_size=16, sink_tokens=16, local_tokens=16, token_budget=64,
                       xattn_stride=4)
    q, k, v = _dev(torch.zeros(1, HQ, D), k, v)
    lengths = warm_up_prefill("xattention", cfg, q, k, v, max_seq_len=200, scale=0.125)
    # Per power-of-two bucket: the top length and one block less (key-block counts that are
    # and are not multiples of 16 compile different kernel variants).
    assert lengths == [32, 48, 64, 112, 128, 184, 200]


def test_warm_up_summary_update_leaves_the_engines_summaries_alone():
    from sparse_kernels.page_summary import allocate_page_summaries
    from sparse_kernels.pipeline import warm_up_summary_update

    k, _, _ = reference.random_paged_kv([64, 40], HKV, D, PAGE)
    (k,) = _dev(k)
    summaries = allocate_page_summaries(k).normal_()
    before = summaries.clone()
    warm_up_summary_update(k, summaries)
    assert torch.equal(summaries, before)


@pytest.mark.parametrize("num_last", [1, 2])
def test_dense_last_blocks(num_last):
    """prefill_dense_last_blocks: the last query blocks of each sequence in the chunk keep every
    causal key block (checked against the streaming reference mask with those rows filled);
    their queries then get dense attention, the other rows keep the estimator's lists."""
    from sparse_kernels.reference_prefill import (lists_to_mask, ref_q_blocks,
                                                  ref_streaming_mask)

    q, k, v, bt, qsl, sl, meta = _prefill_case()
    scale = 1 / math.sqrt(D)
    dense = reference.dense_attention(q, k, v, bt, qsl, sl)
    base = SparseConfig(block_size=16, sink_tokens=16, local_tokens=16, token_budget=64)
    cfg = SparseConfig(block_size=16, sink_tokens=16, local_tokens=16, token_budget=64,
                       prefill_dense_last_blocks=num_last)
    slots = ref_q_blocks(qsl, sl, 16)
    nkb = meta.max_kv_blocks
    want = ref_streaming_mask(qsl, sl, HKV, 16, 16, 16, meta.num_q_blocks, nkb)
    last_rows = []
    for s, (b, i, t0, n) in enumerate(slots):
        if i > (int(sl[b]) - 1) // 16 - num_last:
            want[s, :, : i + 1] = True
            last_rows.extend(range(t0, t0 + n))
    q, k, v, bt = _dev(q, k, v, bt)
    meta = _meta_to_device(meta)
    from sparse_kernels.pipeline import estimate_prefill_blocks

    lists = estimate_prefill_blocks("streaming", cfg, q, k, bt, meta, scale)
    plain = estimate_prefill_blocks("streaming", base, q, k, bt, meta, scale)
    assert torch.equal(lists_to_mask(lists.block_idx, lists.block_count, nkb), want)
    assert float(lists.density) > float(plain.density)
    out, ref_out = torch.empty_like(q), torch.empty_like(q)
    sparse_prefill_attention("streaming", cfg, q, k, v, bt, meta, out, scale)
    sparse_prefill_attention("streaming", base, q, k, v, bt, meta, ref_out, scale)
    out, ref_out = out.cpu(), ref_out.cpu()
    rows = torch.tensor(last_rows)
    others = torch.tensor(sorted(set(range(q.shape[0])) - set(last_rows)))
    torch.testing.assert_close(out[rows], dense[rows], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out[others], ref_out[others], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ref_out[rows], dense[rows], atol=1e-3)  # the rule changed them


@pytest.mark.parametrize("method", ["xattention", "vertical_slash", "flexprefill"])
def test_sink_tokens_add_first_blocks_to_every_estimator(method):
    """sink_tokens beyond one block: the estimators' lists gain key blocks 0.. of the sink
    (within each row's causal range), everything else they chose stays."""
    from sparse_kernels.pipeline import estimate_prefill_blocks
    from sparse_kernels.reference_prefill import lists_to_mask, ref_q_blocks

    q, k, v, bt, qsl, sl, meta = _prefill_case(seed=3)
    kw = dict(block_size=16, local_tokens=16, token_budget=64, xattn_threshold=0.5,
              xattn_stride=4, vs_vertical=1, vs_slash=1, vs_last_q=16, flex_gamma=0.5)
    scale = 1 / math.sqrt(D)
    q, k, v, bt = _dev(q, k, v, bt)
    meta = _meta_to_device(meta)
    nkb = meta.max_kv_blocks
    plain = estimate_prefill_blocks(method, SparseConfig(sink_tokens=16, **kw), q, k, bt, meta,
                                    scale)
    sunk = estimate_prefill_blocks(method, SparseConfig(sink_tokens=48, **kw), q, k, bt, meta,
                                   scale)
    want = lists_to_mask(plain.block_idx, plain.block_count, nkb)
    for s, (_b, i, _t0, _n) in enumerate(ref_q_blocks(qsl, sl, 16)):
        want[s, :, : min(3, i + 1)] = True
    got = lists_to_mask(sunk.block_idx, sunk.block_count, nkb)  # also checks no duplicates
    assert torch.equal(got, want)
    assert not torch.equal(want, lists_to_mask(plain.block_idx, plain.block_count, nkb))
    cnt = sunk.block_count.cpu()
    for s in range(cnt.shape[0]):  # ascending lists
        for h in range(cnt.shape[1]):
            row = sunk.block_idx.cpu()[s, h, : int(cnt[s, h])]
            assert torch.all(row[1:] > row[:-1])
    assert float(sunk.density) > float(plain.density)


@pytest.mark.parametrize("budget,decode_min", [(64, 160), (48, 0)])
def test_decode_overlap_equals_one_launch(budget, decode_min):
    """decode_attention with ``decode_overlap`` (rows that read every page in a dense-mode
    launch of their own, the selection and the other rows beside it) gives the selection and
    the output of the single-launch path, over a batch of short, dense and sparse rows and a
    padding row; the full rows equal dense attention."""
    import dataclasses

    from sparse_kernels.page_summary import allocate_page_summaries, build_page_summaries
    from sparse_kernels.pipeline import decode_attention, decode_full_pages

    cfg = SparseConfig(token_budget=budget, sink_tokens=16, local_tokens=16,
                       decode_min_seq_len=decode_min)
    cfg.validate()
    seq_lens = [40, 150, 700, 0, 64, 1000]
    full = decode_full_pages(cfg, PAGE)
    assert full == max(budget, cfg.effective_decode_min_seq_len) // PAGE
    k, v, bt = reference.random_paged_kv(seq_lens, HKV, D, PAGE,
                                         generator=torch.Generator().manual_seed(30))
    q = torch.randn(len(seq_lens), HQ, D, generator=torch.Generator().manual_seed(31))
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    summ = allocate_page_summaries(k)
    build_page_summaries(k, summ, bt, sl)
    seen = []

    def engine_rows(seq_lens_full, out, max_len):
        # an engine's dense decode: writes every row (the others, of length 0, with junk)
        seen.append((seq_lens_full.cpu().tolist(), max_len))
        qsl = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
        ref = reference.dense_attention(q.cpu(), k.cpu(), v.cpu(), bt.cpu(), qsl,
                                        seq_lens_full.cpu(), D ** -0.5)
        ref[(seq_lens_full.cpu() == 0) & (sl.cpu() > 0)] = 1e4  # (FlashAttention: 0 if empty)
        out.copy_(ref.to(out.device))

    outs, sels = [], []
    for overlap, engine in ((False, None), (True, None), (True, engine_rows)):
        c = dataclasses.replace(cfg, decode_overlap=overlap)
        out = torch.full_like(q, float("nan"))
        sels.append(decode_attention("topk", c, q, k, v, summ.clone(), bt, sl, out, D ** -0.5,
                                     fuse_summary=True, full_rows_attention=engine).clone())
        outs.append(out)
    assert torch.equal(sels[0], sels[1]) and torch.equal(sels[0], sels[2])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)
    assert seen == [([s if -(-s // PAGE) <= full else 0 for s in seq_lens], full * PAGE)]
    # The lengths built beforehand (an adapter's builder, once per step) are what the engine's
    # launch gets, the very tensor; the output is the same.
    from sparse_kernels.pipeline import full_row_seq_lens

    buf = torch.full_like(sl, -1)
    pre = full_row_seq_lens(cfg, sl, PAGE, out=buf)
    assert pre.data_ptr() == buf.data_ptr() and pre.cpu().tolist() == seen[0][0]
    got = []
    out = torch.full_like(q, float("nan"))
    decode_attention("topk", cfg, q, k, v, summ.clone(), bt, sl, out, D ** -0.5,
                     fuse_summary=True, full_rows_seq_lens=pre,
                     full_rows_attention=lambda s_, o, m: (got.append(s_.data_ptr()),
                                                           engine_rows(s_, o, m)))
    assert got == [buf.data_ptr()] and seen[1] == seen[0]
    torch.testing.assert_close(out, outs[2], rtol=0, atol=0)
    # An engine kernel that writes only the rows it attends (FA3 with seqused_q), with
    # full_rows_disjoint: it runs beside the other rows' attention, not before it (without a
    # side stream, after it: its launch then must not touch their rows); the same output.
    import sparse_kernels.pipeline as pipeline

    order = []

    def own_rows(seq_lens_full, out, max_len):
        order.append("engine")
        mine = -(-sl // PAGE) <= full  # the full rows, empty (padding) rows included
        tmp = torch.empty_like(out)
        engine_rows(seq_lens_full, tmp, max_len)
        out[mine] = tmp[mine]

    real = pipeline.sparse_decode

    def spy(*a, **kw):
        order.append(kw["row_filter"])
        return real(*a, **kw)

    pipeline.sparse_decode = spy
    try:
        for disjoint in (True, False):
            out = torch.full_like(q, float("nan"))
            decode_attention("topk", cfg, q, k, v, summ.clone(), bt, sl, out, D ** -0.5,
                             fuse_summary=True, full_rows_attention=own_rows,
                             full_rows_disjoint=disjoint)
            torch.testing.assert_close(out, outs[2], rtol=0, atol=0)
    finally:
        pipeline.sparse_decode = real
    if DEVICE == "cpu":  # (one stream: the order of the calls is the order of the launches)
        assert order == ["select", "engine", "engine", "select"]
    cpu = [x.cpu() for x in (q, k, v, bt, sl)]
    dense = reference.dense_attention(*cpu[:4], torch.arange(len(seq_lens) + 1,
                                                             dtype=torch.int32), cpu[4])
    rows = [b for b, s in enumerate(seq_lens) if -(-s // PAGE) <= full]
    long = [b for b, s in enumerate(seq_lens) if -(-s // PAGE) > full]
    assert rows and long
    torch.testing.assert_close(outs[1][rows].cpu(), dense[rows], rtol=1e-4, atol=1e-4)
    assert (outs[1][long].cpu() - dense[long]).abs().max() > 1e-3  # those were sparse


@pytest.mark.parametrize("method", ["topk", "dense"])
def test_balanced_dense_mode_launch(monkeypatch, method):
    """decode_dense_kernel "balanced": our dense-mode launch (method "dense"; top-k's rows that
    read every page, beside the selection) is balanced_decode; the selection and the output
    equal the "split" launch's, and warm_up_decode compiles it (it is called)."""
    import dataclasses

    import sparse_kernels.pipeline as pipeline
    from sparse_kernels.config import DECODE_DENSE_KERNELS
    from sparse_kernels.page_summary import allocate_page_summaries, build_page_summaries
    from sparse_kernels.pipeline import decode_attention, warm_up_decode
    from sparse_kernels.sparse_decode import DecodeWorkspace

    cfg = dataclasses.replace(SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16,
                                           decode_min_seq_len=160), decode_overlap=True)
    seq_lens = [40, 150, 700, 0, 64, 1000]
    k, v, bt = reference.random_paged_kv(seq_lens, HKV, D, PAGE,
                                         generator=torch.Generator().manual_seed(40))
    q = torch.randn(len(seq_lens), HQ, D, generator=torch.Generator().manual_seed(41))
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q, k, v, bt, sl = _dev(q, k, v, bt, sl)
    summ = allocate_page_summaries(k)
    build_page_summaries(k, summ, bt, sl)
    ws = DecodeWorkspace(len(seq_lens), HQ, D, device=DEVICE, segments=len(seq_lens) + 8)
    calls = []
    real = pipeline.balanced_decode
    monkeypatch.setattr(pipeline, "balanced_decode",
                        lambda *a, **kw: (calls.append(kw.get("full_pages")), real(*a, **kw)))
    outs, sels = [], []
    assert DECODE_DENSE_KERNELS[:2] == ("split", "balanced")
    for kernel in DECODE_DENSE_KERNELS[:2]:
        c = dataclasses.replace(cfg, decode_dense_kernel=kernel)
        out = torch.full_like(q, float("nan"))
        sels.append(decode_attention(method, c, q, k, v, summ, bt, sl, out, D ** -0.5,
                                     workspace=ws))
        outs.append(out)
    cfg = c
    full = pipeline.decode_full_pages(cfg, PAGE)
    assert calls == [full if method == "topk" else None]
    if method == "topk":
        assert torch.equal(sels[0], sels[1])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    calls.clear()
    warm_up_decode(method, cfg, q, k, v, D ** -0.5)
    assert calls == [1 if method == "topk" else None]


def test_decode_dense_kernel_auto(monkeypatch):
    """decode_dense_kernel "auto" (the default): balanced on grids of at least 3/4 of the SMs
    in (batch x KV heads) rows, split below; "split" / "balanced" whatever the grid."""
    from sparse_kernels import balanced_decode as bd
    from sparse_kernels.pipeline import use_balanced_decode

    monkeypatch.setattr(bd, "_device_sms", lambda device: 132)
    dev = torch.device("cpu")
    auto = SparseConfig()
    assert auto.decode_dense_kernel == "auto"
    assert use_balanced_decode(auto, 16, 8, dev) and use_balanced_decode(auto, 13, 8, dev)
    assert not use_balanced_decode(auto, 12, 8, dev) and not use_balanced_decode(auto, 1, 8, dev)
    assert not use_balanced_decode(SparseConfig(decode_dense_kernel="split"), 64, 8, dev)
    assert use_balanced_decode(SparseConfig(decode_dense_kernel="balanced"), 1, 8, dev)


def test_use_engine_dense_rows(monkeypatch):
    """decode_dense_rows "auto" (the default): the engine's dense decode only in an engine
    whose every row is full (``all_full``) and there on large grids (batch x KV heads above
    half the SMs), ours on small ones and in every longer engine; "engine": always, beside the
    selection with decode_overlap, or where every row is full; "triton": never."""
    from sparse_kernels import sparse_decode as sd
    from sparse_kernels.pipeline import engine_dense_rows_enabled, use_engine_dense_rows

    monkeypatch.setattr(sd, "_device_sms", lambda device: 132)
    dev = torch.device("cpu")
    auto = SparseConfig()
    assert auto.decode_dense_rows == "auto"
    for all_full in (False, True):
        assert not use_engine_dense_rows(auto, 1, 8, dev, all_full=all_full)
        assert not use_engine_dense_rows(auto, 8, 8, dev, all_full)  # 64 rows: <= 132 / 2
        assert use_engine_dense_rows(auto, 16, 8, dev, all_full) == all_full
        assert not use_engine_dense_rows(auto, 16, 2, dev, all_full)  # Qwen2-0.5B's 2 KV heads
        assert engine_dense_rows_enabled(auto, all_full) == all_full
    no_overlap = SparseConfig(decode_dense_rows="engine", decode_overlap=False)
    for batch in (1, 16):
        assert use_engine_dense_rows(SparseConfig(decode_dense_rows="engine"), batch, 8, dev)
        for all_full in (False, True):
            assert not use_engine_dense_rows(SparseConfig(decode_dense_rows="triton"), batch,
                                             8, dev, all_full)
            # without decode_overlap a single launch attends every row: the engine's kernel
            # only where every row is full
            assert use_engine_dense_rows(no_overlap, batch, 8, dev, all_full) == all_full

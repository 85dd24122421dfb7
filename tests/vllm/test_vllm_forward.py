"""The vLLM backend's forward on the CPU (Triton interpreter), against dense attention.

vLLM's builder/impl classes run for real on a hand-made CommonAttentionMetadata and a cache in
vLLM's layout; only FlashAttention-3 (the dense prefill path, CUDA-only) is replaced by the
dense reference here. With a token budget covering every context and threshold-free prefill
settings, every path must equal dense causal attention.
"""

import math
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
# The caches and metadata here are CPU tensors: the kernels must run interpreted. (Compiled
# for a GPU, TRITON_INTERPRET=0, Triton refuses CPU pointers; the engine's own GPU runs are
# the e2e and accuracy scripts under benchmarks/device/.)
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available(),
    reason="CPU tensors: runs under TRITON_INTERPRET=1")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

from sparse_kernels import reference  # noqa: E402
from sparse_kernels.config import SparseConfig  # noqa: E402
from sparse_kernels.pipeline import engine_dense_rows_enabled  # noqa: E402
from vllm_sparse import backend  # noqa: E402

HQ, HKV, D, PAGE = 8, 2, 64, 16


def _builder(cfg: SparseConfig, max_seqs: int, all_full: bool = False,
             masked: bool = False) -> backend.SparseAttentionMetadataBuilder:
    """The builder without a VllmConfig; ``all_full``: an engine whose max_model_len is at
    most the dense decode threshold (its decode_all_full); ``masked``: FA3 takes seqused_q
    (vllm_sparse.full_rows_fa.fa3_masked_ops)."""
    return backend.SparseAttentionMetadataBuilder.without_engine(
        cfg, block_size=PAGE, num_heads_q=HQ, num_heads_kv=HKV, head_size=D, max_seqs=max_seqs,
        max_pages=64, device=torch.device("cpu"), decode_all_full=all_full,
        side_stream=None,  # CPU: the overlapped launches run one after the other
        full_rows_schedule=_schedule(cfg, max_seqs, masked)
        if engine_dense_rows_enabled(cfg, all_full) else None)


@pytest.mark.parametrize("max_model_len, sparse, reuse", [
    (32768, {}, True),  # reuse 4 is the default
    (32768, {"selection_reuse": 1}, False),
    (32768, {"selection_reuse": 4}, True),
    (8192, {"selection_reuse": 4}, False),  # every decode row reads every page: no reuse state
])
def test_builder_from_vllm_config_matches_without_engine(monkeypatch, max_model_len, sparse,
                                                         reuse):
    """The builder vLLM makes (a VllmConfig, CPU device) holds the decode state the tests' and
    benchmarks' config-less builder holds: one code path makes both."""
    from pathlib import Path

    from vllm.config import DeviceConfig, ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    shape = Path(__file__).resolve().parents[2] / "examples" / "model_shapes" / "llama-3.1-8b"
    mc = ModelConfig(model=str(shape), skip_tokenizer_init=True, max_model_len=max_model_len,
                     dtype="bfloat16")
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"),
                    additional_config={"sparse": sparse} if sparse else {})
    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    b = backend.SparseAttentionMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vc, cpu)
    assert b.cfg.selection_reuse == sparse.get("selection_reuse", 4)
    assert b.decode_all_full == (max_model_len <= 2 * b.cfg.token_budget)
    assert (b.reuse_state is not None) == reuse and (b.reuse_keep is not None) == reuse
    assert b.side_stream is None  # (CPU)
    # vLLM's FlashAttention for the rows read whole: where every row is (the auto rule)
    assert (b.full_rows_schedule is not None) == engine_dense_rows_enabled(b.cfg,
                                                                          b.decode_all_full)
    assert (b.full_rows_schedule is not None) == b.decode_all_full
    ref = backend.SparseAttentionMetadataBuilder.without_engine(
        b.cfg, block_size=16, num_heads_q=32, num_heads_kv=8, head_size=128,
        max_seqs=b.selected.shape[0], max_pages=b.select_workspace.max_pages, device=cpu,
        decode_all_full=b.decode_all_full)
    assert (b.num_heads_q, b.num_heads_kv, b.head_size, b.block_size) == (32, 8, 128, 16)
    assert b.selected.shape == ref.selected.shape == (b.selected.shape[0], 8, 512)
    assert b.selected.shape[0] >= vc.scheduler_config.max_num_seqs
    assert b.select_workspace.max_pages >= max_model_len // 16
    for name in ("reuse_state", "reuse_keep"):
        x, y = getattr(b, name), getattr(ref, name)
        assert (x is None and y is None) or x.shape == y.shape
    assert vars(b.workspace).keys() == vars(ref.workspace).keys()


def _schedule(cfg: SparseConfig, max_seqs: int, masked: bool = False):
    """The builder's FullRowsSchedule, as on FA3 with full CUDA graphs, FA3's scheduler
    replaced by a stand-in that records its arguments (``.calls``)."""
    from vllm_sparse.full_rows_fa import FullRowsSchedule

    calls = []

    def get_scheduler_metadata(**kw):
        calls.append(kw)
        return torch.arange(1 + 4 * ((kw["batch_size"] + 3) // 4), dtype=torch.int32) + 7

    s = FullRowsSchedule(cfg, page_size=PAGE, num_heads_q=HQ, num_heads_kv=HKV, head_size=D,
                         kv_dtype=torch.float32, max_seqs=max_seqs, max_model_len=4096,
                         full_cuda_graphs=True, max_cudagraph_size=max_seqs,
                         max_num_splits_for_cuda_graph=32, device=torch.device("cpu"),
                         get_scheduler_metadata=get_scheduler_metadata, masked=masked)
    s.calls = calls
    return s


def _impl(cfg: SparseConfig) -> backend.SparseAttentionImpl:
    impl = backend.SparseAttentionImpl(HQ, D, 1 / math.sqrt(D), HKV, None, None, "auto")
    impl.cfg = cfg
    return impl


class _Layer:
    layer_name = "model.layers.3.self_attn.attn"


@pytest.fixture(autouse=True)
def _no_flash_attention(monkeypatch):
    """No FlashAttention on the CPU: every test runs with the reference stand-ins."""
    _fake_fa3(monkeypatch)


def _fake_fa3(monkeypatch):
    def dense(q, key_cache, value_cache, run, out, scale):
        out.copy_(reference.dense_attention(q, key_cache, value_cache, run.block_table,
                                            run.query_start_loc, run.seq_lens, scale).to(out.dtype))
    monkeypatch.setattr(backend, "_dense_prefill", dense)

    def dense_decode_rows(q, key_cache, value_cache, qsl, bt, scale, max_model_len, seq_lens,
                          out, max_seq_len, *, scheduler_metadata=None, num_splits=0,
                          q_lens=None):
        # as FlashAttention: every row written, the others' (length 0) with what they get;
        # here a large value, so that a sparse row not overwritten after it would show. With
        # q_lens (FA3's seqused_q) only the rows with 1 are written.
        assert int(seq_lens.max()) <= max_seq_len
        ref = reference.dense_attention(q, key_cache, value_cache, bt, qsl, seq_lens, scale)
        ref[seq_lens == 0] = 1e4  # (rows of an empty sequence too: the tests have none)
        if q_lens is None:
            out.copy_(ref.to(out.dtype))
        else:
            mine = q_lens == 1
            out[mine] = ref[mine].to(out.dtype)
    monkeypatch.setattr(backend, "_dense_decode_rows", dense_decode_rows)


def _batch(seq_lens, q_lens, seed):
    """A paged cache in vLLM's layout and the CommonAttentionMetadata of one step."""
    k_cache, v_cache, bt = reference.random_paged_kv(
        seq_lens, HKV, D, PAGE, layout="NHD", generator=torch.Generator().manual_seed(seed))
    kv_cache = torch.cat([k_cache, v_cache], dim=-1).transpose(1, 2)  # logical [B, H, N, 2D]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(qsl[-1])
    m = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=len(seq_lens),
        num_actual_tokens=n, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=bt, slot_mapping=torch.zeros(n, dtype=torch.long),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32))
    return k_cache, v_cache, kv_cache, bt, m


@pytest.mark.parametrize("prefill_method", ["streaming", "xattention"])
def test_mixed_batch_matches_dense_attention(monkeypatch, prefill_method):
    _fake_fa3(monkeypatch)
    # decode, decode, long prefill chunk after a prefix (sparse path), short prefill (dense path)
    seq_lens = [70, 33, 200, 40]
    q_lens = [1, 1, 75, 40]
    # Full-density settings: the budget covers every decode context, the streaming window
    # covers the whole 200-token sequence, XAttention keeps all probability mass.
    cfg = SparseConfig(prefill_method=prefill_method, token_budget=256, sink_tokens=16,
                       local_tokens=240, min_seq_len=100, block_size=16, xattn_threshold=1.0,
                       xattn_stride=4)
    k_cache, v_cache, kv_cache, bt, m = _batch(seq_lens, q_lens, seed=0)
    qsl, n = m.query_start_loc, m.num_actual_tokens
    meta = _builder(cfg, 8).build(0, m)
    # The decode rows read every page (within the budget): they join the dense launch.
    assert meta.num_decodes == 0 and meta.folded_decodes == 2
    assert [(r.sparse, r.req_start, r.req_end) for r in meta.prefill_runs] == [
        (False, 0, 2), (True, 2, 3), (False, 3, 4)]
    q = torch.randn(n, HQ, D)
    out = torch.full((n, HQ, D), float("nan"))
    _impl(cfg).forward(_Layer(), q, None, None, kv_cache, meta, out)
    want = reference.dense_attention(q, k_cache, v_cache, bt, qsl, m.seq_lens)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_mixed_batch_folds_short_decode_rows_into_the_dense_launch(monkeypatch):
    """Eager (mixed) batches: decode rows that read every page go to the dense prefill launch,
    merged with a following dense run; no decode launch of ours runs (sparse_decode and the
    selection are replaced by failures); the read counters count them as read whole, and the
    prefill counters do not count them."""
    from sparse_kernels import pipeline

    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())

    def no_decode_launch(*a, **k):
        raise AssertionError("a decode launch ran for folded rows")

    monkeypatch.setattr(pipeline, "decode_attention", no_decode_launch)
    seq_lens, q_lens = [120, 90, 60], [1, 1, 20]
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=100,
                       decode_min_seq_len=128)
    k_cache, v_cache, kv_cache, bt, m = _batch(seq_lens, q_lens, seed=5)
    meta = _builder(cfg, 4).build(0, m)
    assert meta.num_decodes == 0 and meta.folded_decodes == 2 and meta.num_decode_tokens == 0
    assert [(r.sparse, r.req_start, r.req_end, r.tok_start, r.tok_end, r.max_query_len)
            for r in meta.prefill_runs] == [(False, 0, 3, 0, 22, 20)]

    class Layer0:
        layer_name = "model.layers.0.self_attn.attn"

    q = torch.randn(22, HQ, D)
    out = torch.full((22, HQ, D), float("nan"))
    _impl(cfg).forward(Layer0(), q, None, None, kv_cache, meta, out)
    want = reference.dense_attention(q, k_cache, v_cache, bt, m.query_start_loc, m.seq_lens)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["decode_steps"] == 1 and snap["decode_kv_fraction_read"] == 1.0
    assert snap["prefill_chunks_dense"] == 1
    sums = backend.PATH_COUNTERS.device_sums.tolist()
    assert sums[0] == sums[1] == (120 + 90) * HKV


@pytest.mark.parametrize("longest", [128, 129])
def test_fold_only_where_every_decode_row_reads_every_page(longest):
    """One decode row past the dense threshold (decode_min_seq_len, here above the budget)
    keeps every decode row on the decode path; a pure-decode batch (CUDA graphs) never folds;
    an engine whose decode is dense (decode_all_full) always folds in mixed batches."""
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=100,
                       decode_min_seq_len=128)
    _, _, _, _, m = _batch([60, longest, 40], [1, 1, 20], seed=6)
    meta = _builder(cfg, 4).build(0, m)
    folded = longest <= 128
    assert (meta.folded_decodes, meta.num_decodes) == ((2, 0) if folded else (0, 2))
    assert meta.prefill_runs[0].req_start == (0 if folded else 2)
    assert _builder(cfg, 4, all_full=True).build(0, m).folded_decodes == 2
    _, _, _, _, d = _batch([60, 40], [1, 1], seed=6)
    meta = _builder(cfg, 4).build(0, d)
    assert (meta.folded_decodes, meta.num_decodes, meta.prefill_runs) == (0, 2, [])


def test_decode_reads_only_the_budget(monkeypatch):
    seq_lens = [300, 120]
    # decode_min_seq_len = the budget: no dense rows (120 tokens would be one by default)
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                       decode_min_seq_len=64)
    k_cache, v_cache, kv_cache, bt, m = _batch(seq_lens, [1, 1], seed=1)
    qsl = m.query_start_loc
    builder = _builder(cfg, 4)
    meta = builder.build(0, m)
    impl = _impl(cfg)
    # Summaries of the whole cache as if every token had been written step by step.
    from sparse_kernels.page_summary import build_page_summaries

    impl._summaries = torch.zeros(k_cache.shape[0], 2, HKV, D)
    build_page_summaries(k_cache, impl._summaries, bt, m.seq_lens)
    q = torch.randn(2, HQ, D)
    out = torch.empty(2, HQ, D)
    impl.forward(_Layer(), q, None, None, kv_cache, meta, out)
    # with selection reuse (the default) each layer selects into its own buffer
    assert (impl._selected is not None) == (cfg.selection_reuse > 1)
    sel = (builder.selected if impl._selected is None else impl._selected)[:2]
    k = cfg.token_budget // PAGE
    assert (sel[0] >= 0).sum(-1).tolist() == [k] * HKV  # long sequence: exactly the budget
    assert (sel[1] >= 0).sum(-1).tolist() == [k] * HKV
    from sparse_kernels.reference_decode import ref_sparse_decode

    want = ref_sparse_decode(q, k_cache, v_cache, bt, m.seq_lens, sel, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want.to(out.dtype), atol=2e-4, rtol=2e-4)
    dense = reference.dense_attention(q, k_cache, v_cache, bt, qsl, m.seq_lens)
    assert not torch.allclose(out[0], dense[0], atol=1e-3)  # the long one really was sparse


def test_density_stats_over_layers(monkeypatch):
    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    seq_lens, q_lens = [300, 200], [1, 64]
    cfg = SparseConfig(prefill_method="streaming", token_budget=64, sink_tokens=16,
                       local_tokens=16, min_seq_len=100, block_size=16)
    _, _, kv_cache, _, m = _batch(seq_lens, q_lens, seed=2)
    meta = _builder(cfg, 4).build(0, m)

    class Layer0:
        layer_name = "model.layers.0.self_attn.attn"

    impl = _impl(cfg)
    impl.forward(Layer0(), torch.randn(65, HQ, D), None, None, kv_cache, meta,
                 torch.empty(65, HQ, D))
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["prefill_chunks_sparse"] == 1 and snap["decode_steps"] == 1
    # decode: 4 pages of 16 per KV head, one of them the last, partial page (300 = 18*16 + 12)
    assert snap["decode_kv_fraction_read"] == pytest.approx((3 * 16 + 12) / 300)
    assert 0.0 < snap["prefill_block_density"] < 1.0
    raw = backend.PATH_COUNTERS.device_sums.tolist()
    # another top-k layer: its prefill blocks are summed too, its decode is not measured again
    # (it reads what layer 0 read) but counts in the weighting (two top-k layers)
    _impl(cfg).forward(_Layer(), torch.randn(65, HQ, D), None, None, kv_cache, meta,
                       torch.empty(65, HQ, D))
    raw2 = backend.PATH_COUNTERS.device_sums.tolist()
    assert raw2[:2] == raw[:2] and raw2[3] == 2 * raw[3]
    assert raw2[2] == pytest.approx(2 * raw[2])  # same queries and keys: same lists
    snap2 = backend.PATH_COUNTERS.snapshot()
    assert snap2["decode_kv_fraction_read"] == pytest.approx(snap["decode_kv_fraction_read"])
    assert snap2["prefill_block_density"] == pytest.approx(snap["prefill_block_density"])
    assert snap2["device_sums"][:2] == [2 * raw[0], 2 * raw[1]]


def test_density_stats_with_layers_kept_dense(monkeypatch):
    """head_config keeps layer 0 dense (prefill and decode): decode is measured on layer 1, the
    first top-k layer, and weighted with layer 0 reading everything; layer 0's prefill counts as
    fully computed, and the fallback count is the first sparse-prefill layer's."""
    from sparse_kernels.config import HeadOverride

    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    cfg = SparseConfig(prefill_method="streaming", token_budget=64, sink_tokens=16,
                       local_tokens=16, min_seq_len=100, block_size=16, head_overrides=(
                           HeadOverride(layer=0, heads=None, prefill_method="dense",
                                        decode_method="dense"),))
    assert cfg.first_layer_with("decode") == 1 and cfg.first_layer_with("prefill") == 1
    _, _, kv_cache, _, m = _batch([300, 200], [1, 64], seed=2)
    meta = _builder(cfg, 4).build(0, m)
    layers = [type(f"L{i}", (), {"layer_name": f"model.layers.{i}.self_attn.attn"})
              for i in range(2)]
    q = torch.randn(65, HQ, D)
    _impl(cfg).forward(layers[0](), q, None, None, kv_cache, meta, torch.empty(65, HQ, D))
    raw = backend.PATH_COUNTERS.device_sums.tolist()
    assert raw[:2] == [0.0, 0.0]  # layer 0 decodes dense: not the measuring layer
    assert raw[2] == raw[3] > 0  # its sparse-eligible chunk computed every causal block
    _impl(cfg).forward(layers[1](), q, None, None, kv_cache, meta, torch.empty(65, HQ, D))
    snap = backend.PATH_COUNTERS.snapshot()
    read_one = (3 * 16 + 12) / 300  # a top-k layer's fraction (see the test above)
    assert snap["decode_kv_fraction_read"] == pytest.approx((1.0 + read_one) / 2)
    assert backend.PATH_COUNTERS.decode_layers == {0: "dense", 1: "topk"}
    sums = backend.PATH_COUNTERS.device_sums.tolist()
    layer1_density = (sums[2] - raw[2]) / raw[3]
    assert 0.0 < layer1_density < 1.0
    assert snap["prefill_block_density"] == pytest.approx((1.0 + layer1_density) / 2)


def test_first_layer_with():
    from sparse_kernels.config import HeadOverride

    assert SparseConfig().first_layer_with("decode") == 0
    assert SparseConfig().first_layer_with("prefill") == 0  # dense prefill everywhere: 0
    assert SparseConfig(decode_method="dense").first_layer_with("decode") == 0  # none: 0
    dense01 = tuple(HeadOverride(layer=i, heads=None, prefill_method="dense") for i in (0, 1))
    cfg = SparseConfig(prefill_method="xattention", head_overrides=dense01)
    assert cfg.first_layer_with("prefill") == 2 and cfg.first_layer_with("decode") == 0
    # one KV head of layer 0 sparse is enough
    cfg = SparseConfig(prefill_method="dense", head_overrides=(
        HeadOverride(layer=0, heads=(1,), prefill_method="xattention"),))
    assert cfg.first_layer_with("prefill") == 0


def test_per_head_methods_follow_the_ranks_kv_heads(monkeypatch):
    """head_config names the model's KV heads; under tensor parallelism a rank maps them to
    its own slice (rank 1 of 2 with 2 local KV heads holds the model's KV heads 2 and 3)."""
    from types import SimpleNamespace

    from sparse_kernels.config import HeadOverride

    cfg = SparseConfig(prefill_method="xattention", head_overrides=(
        HeadOverride(layer=None, heads=(0,), prefill_method="streaming"),
        HeadOverride(layer=None, heads=(3,), prefill_method="vertical_slash")))
    vc = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=2),
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: HQ,
                                     get_total_num_kv_heads=lambda: 2 * HKV))
    import vllm.config

    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: vc)
    for rank, want in ((0, {None: "xattention", 0: "streaming"}),
                       (1, {None: "xattention", 1: "vertical_slash"})):
        monkeypatch.setattr(backend, "_tp_rank", lambda rank=rank: rank)
        impl = _impl(cfg)
        assert impl._first_global_kv_head() == rank * HKV
        assert impl._layer_methods(_Layer())[0] == want
    # Replicated KV heads (fewer KV heads than ranks): 4 ranks, 2 KV heads, 1 per rank.
    vc.parallel_config.tensor_parallel_size = 4
    vc.model_config.get_total_num_kv_heads = lambda: 2
    vc.model_config.get_num_attention_heads = lambda pc: HQ // 2  # per rank
    impl = backend.SparseAttentionImpl(HQ // 2, D, 1 / math.sqrt(D), 1, None, None, "auto")
    for rank, first in ((0, 0), (1, 0), (2, 1), (3, 1)):
        monkeypatch.setattr(backend, "_tp_rank", lambda rank=rank: rank)
        assert impl._first_global_kv_head() == first


@pytest.mark.parametrize("select,dense_rows", [("auto", "engine"), ("fused", "engine"),
                                               ("auto", "engine_masked"), ("auto", "triton"),
                                               ("auto", "triton_balanced")])
def test_pure_decode_dense_row_and_fused_summary(monkeypatch, select, dense_rows):
    """A pure-decode batch: a sequence of at most decode_min_seq_len tokens (above the budget)
    reads every page, unscored (sentinel row), beside a sparse one; no separate summary launch
    runs: the KV write (do_kv_cache_update) writes both decode tokens and re-summarizes their
    pages, and forward does not refresh them again; layer 0's stats count the dense row as
    fully read. A mixed batch still runs the summary update. The dense row is
    attended by the engine's dense decode (a stand-in for FlashAttention that also writes the
    sparse row, which the sparse launch must overwrite after it; or, "engine_masked", FA3
    with seqused_q, which writes only the dense row and runs beside the sparse launch) or by
    ours ("triton_balanced": our balanced dense-mode kernel, its segments in the builder's
    workspace)."""
    from sparse_kernels.page_select import DENSE_ROW
    from sparse_kernels.page_summary import build_page_summaries
    from sparse_kernels.reference_decode import ref_page_summaries, ref_sparse_decode

    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    seq_lens = [100, 300]  # 7 pages (budget 4 < 7 <= 8: dense), 19 pages (sparse)
    _fake_fa3(monkeypatch)
    engine_calls = []
    fake_rows = backend._dense_decode_rows
    monkeypatch.setattr(backend, "_dense_decode_rows",
                        lambda *a, **kw: (engine_calls.append((a[7].tolist(), kw)),
                                          fake_rows(*a, **kw)))
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                       decode_select=select,
                       decode_dense_rows=dense_rows.split("_")[0],
                       decode_dense_kernel=("balanced" if "balanced" in dense_rows else
                                            "split" if dense_rows == "triton" else "auto"))
    assert cfg.effective_decode_min_seq_len == 128
    k_cache, v_cache, kv_cache, bt, m = _batch(seq_lens, [1, 1], seed=3)
    builder = _builder(cfg, 4, masked=dense_rows == "engine_masked")
    assert (builder.workspace.segment_out is not None) == (cfg.decode_dense_kernel != "split")
    if builder.workspace.segment_out is not None:
        builder.workspace.segment_out.fill_(float("nan"))  # read only where written
    meta = builder.build(0, m)
    impl = _impl(cfg)
    # Summaries as after the previous step: this step's token not summarized yet.
    impl._summaries = torch.zeros(k_cache.shape[0], 2, HKV, D)
    build_page_summaries(k_cache, impl._summaries, bt, m.seq_lens - 1)
    before = impl._summaries.clone()
    calls = []
    import sparse_kernels.page_summary as page_summary

    real_update = page_summary.update_page_summaries
    monkeypatch.setattr(page_summary, "update_page_summaries",
                        lambda *a, **kw: (calls.append(1), real_update(*a, **kw)))

    class Layer0:
        layer_name = "model.layers.0.self_attn.attn"

    # The step's KV write: the decode tokens' slots are not written yet (poisoned) when it runs.
    key, value, slots = _decode_tokens(kv_cache, bt, seq_lens)
    written = kv_cache.clone()
    kv_view = kv_cache.transpose(1, 2)
    for s_ in slots.tolist():
        kv_view[s_ // PAGE, s_ % PAGE] = 1e4
    impl.do_kv_cache_update(Layer0(), key, value, kv_cache, slots)
    assert torch.equal(kv_cache, written)
    want_summ = ref_page_summaries(k_cache, bt, m.seq_lens, before)
    torch.testing.assert_close(impl._summaries, want_summ, rtol=0, atol=0)
    # forward does not refresh them: no summary launch, no refresh in the scoring launch
    import sparse_kernels.pipeline as pipeline

    fused, disjoint = [], []
    real_decode = pipeline.decode_attention
    monkeypatch.setattr(pipeline, "decode_attention",
                        lambda *a, **kw: (fused.append(kw["fuse_summary"]),
                                          disjoint.append(kw["full_rows_disjoint"]),
                                          real_decode(*a, **kw))[2])
    q = torch.randn(2, HQ, D)
    out = torch.full((2, HQ, D), float("nan"))
    impl.forward(Layer0(), q, None, None, kv_cache, meta, out)
    assert calls == [] and fused == [False]
    # the engine's kernel got the dense row only (the sparse one's length zeroed), with the
    # schedule the builder made once for the step (FA3's, from those lengths)
    assert disjoint == [dense_rows == "engine_masked"]
    if dense_rows.startswith("engine"):
        ((lens, kw),) = engine_calls
        assert lens == [100, 0] and kw["num_splits"] == 32
        masked = dense_rows == "engine_masked"
        assert (kw["q_lens"].tolist() if masked else kw["q_lens"]) == ([1, 0] if masked
                                                                       else None)
        (sched_call,) = builder.full_rows_schedule.calls
        assert sched_call["cache_seqlens"].tolist() == [100, 0]
        assert sched_call["batch_size"] == 2 and sched_call["max_seqlen_k"] == 128
        assert kw["scheduler_metadata"].data_ptr() == builder.full_rows_schedule.sched.data_ptr()
        assert meta.full_rows.seq_lens.tolist() == [100, 0]
    else:
        assert engine_calls == [] and meta.full_rows is None
    torch.testing.assert_close(impl._summaries, want_summ, rtol=0, atol=0)
    assert not torch.equal(want_summ, before)  # the step's token changed its page's summary
    sel = (builder.selected if impl._selected is None else impl._selected)[:2]
    k = cfg.token_budget // PAGE
    assert sel[0].tolist() == [[DENSE_ROW] + [-1] * (k - 1)] * HKV
    assert (sel[1] >= 0).sum(-1).tolist() == [k] * HKV
    dense = reference.dense_attention(q, k_cache, v_cache, bt, m.query_start_loc, m.seq_lens)
    torch.testing.assert_close(out[0], dense[0], atol=2e-4, rtol=2e-4)
    want = ref_sparse_decode(q, k_cache, v_cache, bt, m.seq_lens, sel, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want.to(out.dtype), atol=2e-4, rtol=2e-4)
    assert not torch.allclose(out[1], dense[1], atol=1e-3)  # the long one really was sparse
    # stats: the dense row reads its 100 tokens, the sparse one 3 full pages + its last 12
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["decode_kv_fraction_read"] == pytest.approx((100 + 3 * 16 + 12) / 400)

    # A mixed batch (decode + prefill) runs the summary update for the prefill tokens.
    _fake_fa3(monkeypatch)
    _, _, kv_cache, _, m = _batch([100, 40], [1, 40], seed=4)
    meta = builder.build(0, m)
    impl.forward(_Layer(), torch.randn(41, HQ, D), None, None, kv_cache, meta,
                 torch.empty(41, HQ, D))
    assert calls == [1]


def _decode_tokens(kv_cache, bt, seq_lens):
    """(key, value, slot_mapping) of each sequence's last token, as vLLM passes them to
    do_kv_cache_update (one token per sequence), read from a cache that holds them."""
    kv_view = kv_cache.transpose(1, 2)  # [B, N, H, 2D]
    slots = torch.tensor([int(bt[b, (s - 1) // PAGE]) * PAGE + (s - 1) % PAGE
                          for b, s in enumerate(seq_lens)], dtype=torch.int64)
    kv = torch.stack([kv_view[s // PAGE, s % PAGE] for s in slots.tolist()])  # [T, H, 2D]
    return kv[..., :D].clone(), kv[..., D:].clone(), slots


@pytest.mark.parametrize("sharing", [False, True])
def test_decode_summaries_kept_by_the_write_or_the_scoring(monkeypatch, sharing):
    """Where the layer's KV write keeps the summaries, forward's scoring does not refresh them;
    a layer that shares another's KV cache (no KV write of its own) refreshes them in its
    scoring launch. Either way the decode token's page summary is exact after the step."""
    from sparse_kernels.page_summary import build_page_summaries
    from sparse_kernels.reference_decode import ref_page_summaries

    seq_lens = [300, 250]  # both selected (19 and 16 pages, budget 4, dense up to 8)
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0)
    k_cache, _, kv_cache, bt, m = _batch(seq_lens, [1, 1], seed=6)
    meta = _builder(cfg, 4).build(0, m)
    impl = _impl(cfg)
    if sharing:
        impl.kv_sharing_target_layer_name = "model.layers.2.self_attn.attn"
    impl._summaries = torch.zeros(k_cache.shape[0], 2, HKV, D)
    build_page_summaries(k_cache, impl._summaries, bt, m.seq_lens - 1)
    before = impl._summaries.clone()
    assert impl._write_keeps_summaries(_Layer(), PAGE) is not sharing
    if not sharing:
        impl.do_kv_cache_update(_Layer(), *_decode_tokens(kv_cache, bt, seq_lens)[:2], kv_cache,
                                _decode_tokens(kv_cache, bt, seq_lens)[2])
    impl.forward(_Layer(), torch.randn(2, HQ, D), None, None, kv_cache, meta,
                 torch.empty(2, HQ, D))
    want = ref_page_summaries(k_cache, bt, m.seq_lens, before)
    assert not torch.equal(want, before)
    torch.testing.assert_close(impl._summaries, want, rtol=0, atol=0)


def test_stats_count_dense_decode_rows_as_fully_read_in_mixed_batches(monkeypatch):
    """A decode row of at most decode_min_seq_len tokens (dense row) beside a sparse decode row
    and a prefill chunk: the layer-0 sums count the dense row's whole sequence as read."""
    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    seq_lens, q_lens = [120, 300, 200], [1, 1, 64]
    cfg = SparseConfig(prefill_method="streaming", token_budget=64, sink_tokens=16,
                       local_tokens=16, min_seq_len=100, block_size=16, decode_min_seq_len=128)
    _, _, kv_cache, _, m = _batch(seq_lens, q_lens, seed=4)
    meta = _builder(cfg, 4).build(0, m)
    assert meta.num_decodes == 2

    class Layer0:
        layer_name = "model.layers.0.self_attn.attn"

    _impl(cfg).forward(Layer0(), torch.randn(66, HQ, D), None, None, kv_cache, meta,
                       torch.empty(66, HQ, D))
    sums = backend.PATH_COUNTERS.device_sums.tolist()
    # dense row: 120 tokens per KV head; sparse row: 3 full pages + the partial last (12)
    assert sums[0] == (120 + 3 * 16 + 12) * HKV and sums[1] == (120 + 300) * HKV


def test_capture_builds_reset_the_counts(monkeypatch):
    """vLLM's start-up batches (warm-up, CUDA-graph capture) are not served requests: a capture
    build forgets what was counted before it, later builds count again."""
    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    cfg = SparseConfig(prefill_method="streaming", token_budget=64, sink_tokens=16,
                       local_tokens=16, min_seq_len=100, block_size=16)
    _, _, kv_cache, _, m = _batch([300, 200], [1, 64], seed=2)
    builder = _builder(cfg, 4)

    class Layer0:
        layer_name = "model.layers.0.self_attn.attn"

    meta = builder.build(0, m)  # a warm-up batch
    _impl(cfg).forward(Layer0(), torch.randn(65, HQ, D), None, None, kv_cache, meta,
                       torch.empty(65, HQ, D))
    before = backend.PATH_COUNTERS.snapshot()
    assert before["decode_steps"] == 1 and before["prefill_chunks_sparse"] == 1
    assert any(before["device_sums"])
    builder.build_for_cudagraph_capture(m)  # a capture: counts start again from this batch
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["decode_steps"] == 1 and snap["prefill_chunks_sparse"] == 1
    assert snap["device_sums"] == [0.0] * 4
    builder.build(0, m)  # a served batch counts
    assert backend.PATH_COUNTERS.snapshot()["decode_steps"] == 2


def test_worker_warm_up_resets_the_counts(monkeypatch):
    """After CUDA-graph capture vLLM 0.26 still runs a sampler warm-up batch through build()
    (max_num_seqs one-token requests); the counts restart when the worker's
    compile_or_warm_up_model returns. The hook wraps the method once, on the worker class
    already imported, and the real vLLM worker class has that method."""
    import sys
    import types

    from vllm.v1.worker import gpu_worker  # noqa: F401 - the hook looks it up in sys.modules

    assert callable(getattr(sys.modules["vllm.v1.worker.gpu_worker"].Worker,
                            "compile_or_warm_up_model", None))
    _fake_fa3(monkeypatch)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    cfg = SparseConfig(prefill_method="streaming", token_budget=64, sink_tokens=16,
                       local_tokens=16, min_seq_len=100, block_size=16)
    _, _, _, _, m = _batch([300, 200], [1, 64], seed=2)
    calls = []
    # Every build() may log the stats line; none may while vLLM is still starting up.
    monkeypatch.setattr(backend, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(backend.metrics, "WRITE_EVERY_S", 1e9)
    stats_lines = []
    monkeypatch.setattr(backend.logger, "info",  # the main stats line (not reuse's)
                        lambda msg, *a: stats_lines.append(a)
                        if "stats: prefill chunks" in msg else None)

    class Worker:
        def compile_or_warm_up_model(self):
            builder.build(0, m)  # the post-capture warm-up batch
            calls.append(backend.PATH_COUNTERS.snapshot()["decode_steps"])
            calls.append(len(stats_lines))
            return "compile times"

    fake = types.ModuleType("vllm.v1.worker.gpu_worker")
    fake.Worker = Worker
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_worker", fake)
    builder = _builder(cfg, 4)  # (the builder's __init__, skipped here, installs the hook)
    assert backend.reset_counts_after_warm_up()
    wrapped = Worker.compile_or_warm_up_model
    assert wrapped._sparse_serve_resets_counts
    assert backend.reset_counts_after_warm_up() and Worker.compile_or_warm_up_model is wrapped
    # vLLM runs forward in inference mode, where the device sums are first made; the hook
    # resets them outside it (a plain zero_() raised there on the GPU, 2026-11-23).
    with torch.inference_mode():
        sums = backend.PATH_COUNTERS.sums_for(torch.device("cpu"))
        sums += 1.0
    assert sums.is_inference()
    assert Worker().compile_or_warm_up_model() == "compile times"
    assert calls == [1, 0]  # counted while warming up, not logged ...
    assert sums.tolist() == [0.0] * 4 and backend.PATH_COUNTERS.device_sums is sums
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["decode_steps"] == 0 and snap["prefill_chunks_sparse"] == 0  # ... not after
    assert not backend.PATH_COUNTERS.starting_up
    builder.build(0, m)
    assert backend.PATH_COUNTERS.snapshot()["decode_steps"] == 1
    assert len(stats_lines) == 1 and stats_lines[0][5] == 1  # served steps are logged
    # A reset that fails (it must never stop vLLM's start-up) is a warning, not an error.
    def broken_reset():
        raise RuntimeError("no reset today")

    monkeypatch.setattr(backend.PATH_COUNTERS, "reset", broken_reset)
    warnings = []
    monkeypatch.setattr(backend.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    assert Worker().compile_or_warm_up_model() == "compile times"
    assert len(warnings) == 1 and "no reset today" in warnings[0]
    monkeypatch.delitem(sys.modules, "vllm.v1.worker.gpu_worker")
    assert not backend.reset_counts_after_warm_up()  # no worker class: nothing to wrap


@pytest.mark.parametrize("dense_rows", ["engine", "auto", "triton"])
def test_short_engine_decodes_dense(monkeypatch, dense_rows):
    """An engine whose max_model_len is at most the dense decode threshold (every decode row
    would read every page): decode runs dense, with no page selection and no summary
    maintenance, through the engine's kernel (every row, its whole length, the step's FA3
    schedule) or ours; the output is dense attention's. With decode_overlap off, the engine's
    kernel is still used there (no rows beside a selection to overlap with)."""
    from sparse_kernels import page_select
    from sparse_kernels import pipeline
    import sparse_kernels.page_summary as page_summary

    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                       decode_dense_rows=dense_rows, decode_overlap=dense_rows != "engine")
    # 128 tokens: decode_full_pages * page (dense threshold 2 x budget)
    assert pipeline.all_decode_rows_full(cfg, PAGE, 128)
    assert not pipeline.all_decode_rows_full(cfg, PAGE, 129)
    assert not pipeline.all_decode_rows_full(cfg, PAGE, None)
    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    engine_calls, selects, updates = [], [], []
    fake_rows = backend._dense_decode_rows
    monkeypatch.setattr(backend, "_dense_decode_rows",
                        lambda *a, **kw: (engine_calls.append((a[7].tolist(), a[9], kw)),
                                          fake_rows(*a, **kw)))
    real_select = page_select.select_pages
    monkeypatch.setattr(page_select, "select_pages",
                        lambda *a, **kw: (selects.append(1), real_select(*a, **kw))[1])
    monkeypatch.setattr(pipeline, "select_pages",
                        lambda *a, **kw: (selects.append(1), real_select(*a, **kw))[1])
    real_update = page_summary.update_page_summaries
    monkeypatch.setattr(page_summary, "update_page_summaries",
                        lambda *a, **kw: (updates.append(1), real_update(*a, **kw)))
    seq_lens = [100, 128, 7]
    k_cache, v_cache, kv_cache, bt, m = _batch(seq_lens, [1, 1, 1], seed=9)
    builder = _builder(cfg, 4, all_full=True)
    meta = builder.build(0, m)
    assert meta.decode_all_full
    impl = _impl(cfg)
    q = torch.randn(3, HQ, D)
    out = torch.full((3, HQ, D), float("nan"))
    impl.forward(_Layer(), q, None, None, kv_cache, meta, out)
    dense = reference.dense_attention(q, k_cache, v_cache, bt, m.query_start_loc, m.seq_lens)
    torch.testing.assert_close(out, dense, atol=2e-4, rtol=2e-4)
    assert selects == []
    if dense_rows != "triton":  # ("auto": 3 rows x 2 KV heads is a large grid on 4 CPU "SMs")
        ((lens, bound, kw),) = engine_calls
        assert lens == seq_lens and bound == bt.shape[1] * PAGE and kw["num_splits"] == 32
        (sched_call,) = builder.full_rows_schedule.calls
        assert sched_call["cache_seqlens"].tolist() == seq_lens
    else:
        assert engine_calls == [] and builder.full_rows_schedule is None
    # a mixed batch: the prefill needs no summaries in this engine (no layer ever selects)
    _, _, kv_cache, bt, m = _batch([100, 40], [1, 40], seed=10)
    meta = builder.build(0, m)
    q = torch.randn(41, HQ, D)
    out = torch.full((41, HQ, D), float("nan"))
    impl.forward(_Layer(), q, None, None, kv_cache, meta, out)
    assert updates == [] and selects == []
    assert impl._summaries is None  # no summary memory in an engine that never selects
    k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    want = reference.dense_attention(q, k_cache, v_cache, bt, m.query_start_loc, m.seq_lens)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_selection_reuse_keeps_each_layers_selection(monkeypatch):
    """selection_reuse=4 through the builder and two layers: step 1 selects; step 2 (one token
    more, same pages, new queries) keeps every row's selection, each layer its own, and
    attends over it; a mixed step keeps the decode row and clears the prefill row's tag; the
    counters add kept and decode rows."""
    import dataclasses

    from sparse_kernels.page_summary import build_page_summaries
    from sparse_kernels.reference_decode import ref_sparse_decode

    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    # (selection_reuse_after=0: from a request's first generated token, as the kernel tests
    # check the warm-up itself)
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                       decode_min_seq_len=64, selection_reuse=4, selection_reuse_after=0)
    k_cache, v_cache, kv_cache, bt, m = _batch([310, 130], [1, 1], seed=11)
    builder = _builder(cfg, 4)
    layers = []
    for i in (3, 4):
        layer = type("L", (), {"layer_name": f"model.layers.{i}.self_attn.attn"})()
        impl = _impl(cfg)
        impl._summaries = torch.zeros(k_cache.shape[0], 2, HKV, D)
        layers.append((layer, impl))
    g = torch.Generator().manual_seed(12)
    sels = []
    for step, lens in enumerate(([300, 120], [301, 121])):
        sl = torch.tensor(lens, dtype=torch.int32)
        meta = builder.build(0, dataclasses.replace(m, seq_lens=sl, max_seq_len=max(lens),
                                                    seq_lens_cpu_upper_bound=sl.clone()))
        assert builder.reuse_keep[:2].tolist() == [step, step]
        per_layer = []
        for layer, impl in layers:
            build_page_summaries(k_cache, impl._summaries, bt, sl)
            q = torch.randn(2, HQ, D, generator=g)
            out = torch.empty(2, HQ, D)
            impl.forward(layer, q, None, None, kv_cache, meta, out)
            sel = impl._selected[:2].clone()
            want = ref_sparse_decode(q, k_cache, v_cache, bt, sl, sel, 1 / math.sqrt(D))
            torch.testing.assert_close(out, want.to(out.dtype), atol=2e-4, rtol=2e-4)
            assert (sel >= 0).sum(-1).tolist() == [[4] * HKV] * 2
            per_layer.append(sel)
        assert not torch.equal(per_layer[0], per_layer[1])  # each layer its own selection
        sels.append(per_layer)
    assert all(torch.equal(a, b) for a, b in zip(sels[0], sels[1]))  # kept, not re-selected
    # A mixed step: row 0 decodes (kept: 2 tokens since its selection), row 1 is a prefill
    # chunk (its tag cleared); the shared buffer is not the layers' own
    sl = torch.tensor([302, 130], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 10], dtype=torch.int32)
    mixed = dataclasses.replace(m, seq_lens=sl, query_start_loc=qsl,
                                query_start_loc_cpu=qsl.clone(), num_actual_tokens=10,
                                max_query_len=9, max_seq_len=302,
                                seq_lens_cpu_upper_bound=sl.clone(),
                                slot_mapping=torch.zeros(10, dtype=torch.long))
    meta = builder.build(0, mixed)
    assert meta.num_decodes == 1 and builder.reuse_keep[:2].tolist() == [1, 0]
    assert builder.reuse_state[2, :2].tolist() == [300, 0]
    assert builder.selected.data_ptr() != layers[0][1]._selected.data_ptr()
    kept, rows = backend.PATH_COUNTERS.reuse_sums.tolist()
    assert (kept, rows) == (3.0, 5.0)
    snap = backend.PATH_COUNTERS.snapshot()
    assert snap["decode_selection_reuse_fraction"] == 0.6


def _engine_layers(monkeypatch, cfg, n_blocks=40):
    """Four attention layers of this backend in a stand-in forward context (layer 2 decodes
    dense by the config's override); returns them."""
    import types

    import vllm.forward_context as fc

    layers = {}
    for i in range(4):
        lay = types.SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn",
                                    impl=_impl(cfg),
                                    kv_cache=torch.zeros(n_blocks, HKV, PAGE, 2 * D))
        layers[lay.layer_name] = lay
    layers["model.layers.0.mlp"] = types.SimpleNamespace(kv_cache=None)  # not attention
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context",
                        lambda: types.SimpleNamespace(no_compile_layers=layers))
    return [v for v in layers.values() if hasattr(v, "impl")]


def _three_topk_layers_config():
    from sparse_kernels.config import HeadOverride

    return SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                        selection_reuse=4,
                        head_overrides=(HeadOverride(layer=2, heads=None, decode_method="dense"),))


def test_start_up_buffers_of_every_top_k_layer_come_at_once(monkeypatch):
    """The first layer to need page summaries (or stored selections) allocates them for every
    top-k layer of the engine in one go: later layers find theirs; a dense-decode layer gets
    none."""
    layers = _engine_layers(monkeypatch, _three_topk_layers_config())
    first = layers[1]
    s = first.impl._get_summaries(first.impl._kv_views(first.kv_cache)[0])
    assert s.shape[0] == 40
    have = [lay.impl._summaries is not None for lay in layers]
    assert have == [True, True, False, True]
    assert layers[3].impl._get_summaries(layers[3].impl._kv_views(layers[3].kv_cache)[0]) \
        is layers[3].impl._summaries  # already there, not reallocated
    shared = torch.full((4, HKV, 4), -1, dtype=torch.int32)
    first.impl._get_selected(shared)
    assert [lay.impl._selected is not None for lay in layers] == [True, True, False, True]
    assert layers[0].impl._selected.data_ptr() != layers[1].impl._selected.data_ptr()


@pytest.mark.parametrize("which", ["summaries", "selections"])
def test_start_up_buffers_that_do_not_fit_stop_before_any_allocation(monkeypatch, which):
    """When every top-k layer's buffers would not leave the start-up margin free, the first
    layer raises vLLM's out-of-memory error type with the total, what is free and what to
    change, and no layer keeps a buffer."""
    layers = _engine_layers(monkeypatch, _three_topk_layers_config())
    per_layer = 40 * 2 * HKV * D * 4 if which == "summaries" else 4 * HKV * 4 * 4
    free = backend.START_UP_MARGIN_BYTES + 3 * per_layer - 1  # one byte short
    monkeypatch.setattr(backend, "_free_device_bytes", lambda device: free)
    monkeypatch.setattr(backend, "_device_total_bytes", lambda device: 80 << 30)
    # weights and KV cache take all that the utilization planned: the margin alone is reserved
    monkeypatch.setattr(backend, "_allocated_bytes", lambda device: int(0.93 * (80 << 30)))
    impl = layers[0].impl
    impl._memory_setting = (0.93, None)
    with pytest.raises(torch.OutOfMemoryError) as e:
        if which == "summaries":
            impl._get_summaries(impl._kv_views(layers[0].kv_cache)[0])
        else:
            impl._get_selected(torch.full((4, HKV, 4), -1, dtype=torch.int32))
    msg = str(e.value)
    assert "3 layers need" in msg and "--gpu-memory-utilization" in msg, msg
    # one byte short: a hundredth lower frees it
    assert "Run with --gpu-memory-utilization 0.92 or less (now 0.93)" in msg, msg
    assert all(lay.impl._summaries is None and lay.impl._selected is None for lay in layers)
    monkeypatch.setattr(backend, "_free_device_bytes", lambda device: free + 1)  # just fits
    if which == "summaries":
        impl._get_summaries(impl._kv_views(layers[0].kv_cache)[0])
    else:
        impl._get_selected(torch.full((4, HKV, 4), -1, dtype=torch.int32))


def test_start_up_reserve_is_what_the_utilization_planned():
    """With --gpu-memory-utilization the buffers must leave free what vLLM planned beyond the
    weights and KV cache (allocated when they come), at least the margin; with the KV cache
    in bytes vLLM plans nothing and the margin alone stays free."""
    gib = 2**30
    total = 80 * gib
    allocated = int(0.9 * total) - backend.START_UP_MARGIN_BYTES - gib
    planned = int(0.9 * total) - allocated  # the margin and 1 GiB more still to come
    assert backend._start_up_reserve((0.9, None), total, allocated) == planned
    assert backend._start_up_reserve((0.9, None), total, 72 * gib) == backend.START_UP_MARGIN_BYTES
    assert backend._start_up_reserve((0.9, 50 * gib), total, 60 * gib) \
        == backend.START_UP_MARGIN_BYTES
    assert backend._start_up_reserve(None, total, 0) == backend.START_UP_MARGIN_BYTES


def test_room_suggestion_frees_the_shortfall():
    """The suggested setting shrinks the KV cache by the shortfall over 1 + the buffers' bytes
    per KV byte (they shrink with it), rounded to a safe side: H100 numbers of session 24
    (0.93, 3.54 GiB of summaries for 56.69 GiB of KV, 4.22 GiB free, 1 GiB margin) give 0.92,
    the utilization below the one that failed there without the margin."""
    gib = 2**30
    short = int((3.54 + 1.0 - 4.22) * gib)
    msg = backend._room_suggestion(short, 3.54 / 56.69, (0.93, None), int(79.18 * gib))
    assert "--gpu-memory-utilization 0.92 or less (now 0.93)" in msg
    msg = backend._room_suggestion(short, 1 / 16, (0.9, 61 * gib), int(79.18 * gib))
    cut = math.ceil(short / (1 + 1 / 16))
    assert f"--kv-cache-memory-bytes {61 * gib - cut} or less" in msg
    # freeing `cut` of KV frees the shortfall: cut + the summaries' share of it
    assert cut * (1 + 1 / 16) >= short


@pytest.mark.parametrize("which", ["summaries", "selections"])
def test_start_up_allocation_out_of_memory_says_what_to_change(monkeypatch, which):
    """The per-layer buffers allocated on the first forward (outside vLLM's KV budget): out of
    memory there names the buffer, its size and the settings that make room, and stays an
    OutOfMemoryError."""
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0,
                       selection_reuse=4)
    impl = _impl(cfg)
    k_cache = torch.zeros(40, PAGE, HKV, D)

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    if which == "summaries":
        import sparse_kernels.page_summary as page_summary

        monkeypatch.setattr(page_summary, "allocate_page_summaries", oom)
        call, want = (lambda: impl._get_summaries(k_cache)), "page summaries"
        size = 40 * 2 * HKV * D * 4 / 2**20
    else:
        monkeypatch.setattr(torch, "full_like", oom)
        shared = torch.full((4, HKV, 4), -1, dtype=torch.int32)
        call, want = (lambda: impl._get_selected(shared)), "stored page selections"
        size = shared.numel() * 4 / 2**20
    with pytest.raises(torch.OutOfMemoryError) as e:
        call()
    msg = str(e.value)
    assert want in msg and f"{size:.1f} MiB" in msg and "--gpu-memory-utilization" in msg
    assert "Tried to allocate" in msg  # the original error is kept
    # nothing half-made is kept: the next forward tries again
    assert impl._summaries is None and impl._selected is None


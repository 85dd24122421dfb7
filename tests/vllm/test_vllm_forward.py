"""The vLLM backend's forward on the CPU (Triton interpreter), against dense attention.

vLLM's builder/impl classes run for real on a hand-made CommonAttentionMetadata and a cache in
vLLM's layout; only FlashAttention-3 (the dense prefill path, CUDA-only) is replaced by the
dense reference here. With a token budget covering every context and threshold-free prefill
settings, every path must equal dense causal attention.
"""

import math

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

from sparse_kernels import reference  # noqa: E402
from sparse_kernels.config import SparseConfig  # noqa: E402
from sparse_kernels.page_select import SelectWorkspace  # noqa: E402
from sparse_kernels.sparse_decode import DecodeWorkspace  # noqa: E402
from vllm_sparse import backend  # noqa: E402

HQ, HKV, D, PAGE = 8, 2, 64, 16


def _builder(cfg: SparseConfig, max_seqs: int) -> backend.SparseAttentionMetadataBuilder:
    b = object.__new__(backend.SparseAttentionMetadataBuilder)  # no VllmConfig on the CPU
    b.cfg, b.block_size = cfg, PAGE
    b.num_heads_q, b.num_heads_kv, b.head_size = HQ, HKV, D
    k = cfg.token_budget // PAGE
    b.selected = torch.full((max_seqs, HKV, k), -1, dtype=torch.int32)
    b.workspace = DecodeWorkspace(max_seqs, HQ, D, device=torch.device("cpu"))
    b.select_workspace = SelectWorkspace(max_seqs, HKV, 64, device="cpu", counters=False)
    return b


def _impl(cfg: SparseConfig) -> backend.SparseAttentionImpl:
    impl = backend.SparseAttentionImpl(HQ, D, 1 / math.sqrt(D), HKV, None, None, "auto")
    impl.cfg = cfg
    return impl


class _Layer:
    layer_name = "model.layers.3.self_attn.attn"


def _fake_fa3(monkeypatch):
    def dense(q, key_cache, value_cache, run, out, scale):
        out.copy_(reference.dense_attention(q, key_cache, value_cache, run.block_table,
                                            run.query_start_loc, run.seq_lens, scale).to(out.dtype))
    monkeypatch.setattr(backend, "_dense_prefill", dense)


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
    assert meta.num_decodes == 2
    assert [(r.sparse, r.req_start, r.req_end) for r in meta.prefill_runs] == [
        (True, 2, 3), (False, 3, 4)]
    q = torch.randn(n, HQ, D)
    out = torch.full((n, HQ, D), float("nan"))
    _impl(cfg).forward(_Layer(), q, None, None, kv_cache, meta, out)
    want = reference.dense_attention(q, k_cache, v_cache, bt, qsl, m.seq_lens)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_decode_reads_only_the_budget(monkeypatch):
    seq_lens = [300, 120]
    cfg = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, min_seq_len=0)
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
    sel = builder.selected[:2]
    k = cfg.token_budget // PAGE
    assert (sel[0] >= 0).sum(-1).tolist() == [k] * HKV  # long sequence: exactly the budget
    assert (sel[1] >= 0).sum(-1).tolist() == [k] * HKV
    from sparse_kernels.reference_decode import ref_sparse_decode

    want = ref_sparse_decode(q, k_cache, v_cache, bt, m.seq_lens, sel, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want.to(out.dtype), atol=2e-4, rtol=2e-4)
    dense = reference.dense_attention(q, k_cache, v_cache, bt, qsl, m.seq_lens)
    assert not torch.allclose(out[0], dense[0], atol=1e-3)  # the long one really was sparse


def test_layer0_accumulates_density_stats(monkeypatch):
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
    # another layer adds nothing
    _impl(cfg).forward(_Layer(), torch.randn(65, HQ, D), None, None, kv_cache, meta,
                       torch.empty(65, HQ, D))
    assert backend.PATH_COUNTERS.snapshot() == snap

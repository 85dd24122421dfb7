"""vllm_sparse.full_rows_fa: the once-per-step inputs of vLLM's FlashAttention for the decode
rows that read every page (SPARSE_DECODE_DENSE_ROWS=engine|auto), as vLLM's FLASH_ATTN builder
makes its ahead-of-time FA3 schedule. FA3's scheduler is replaced by a recording stand-in."""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from sparse_kernels.config import SparseConfig  # noqa: E402
from vllm_sparse.full_rows_fa import FullRowsSchedule, make_full_rows_schedule  # noqa: E402

PAGE = 16
# budget 64 tokens (4 pages); rows of at most 2 x 64 = 128 tokens (8 pages) read every page
CFG = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, decode_dense_rows="engine")


def _schedule(full_cuda_graphs=True, capture=8, scheduler=True, max_model_len=4096,
              masked=False):
    calls = []

    def get_scheduler_metadata(**kw):
        calls.append(kw)
        return torch.full((1 + 4 * ((kw["batch_size"] + 3) // 4),), 5, dtype=torch.int32)

    s = FullRowsSchedule(CFG, page_size=PAGE, num_heads_q=8, num_heads_kv=2, head_size=64,
                         kv_dtype=torch.bfloat16, max_seqs=8, max_model_len=max_model_len,
                         full_cuda_graphs=full_cuda_graphs, max_cudagraph_size=capture,
                         max_num_splits_for_cuda_graph=32, device=torch.device("cpu"),
                         get_scheduler_metadata=get_scheduler_metadata if scheduler else None,
                         masked=masked)
    return s, calls


def _step(s, lens, max_seq_len=None, device="cpu"):
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    return s.prepare(seq, qsl, len(lens), max(lens) if max_seq_len is None else max_seq_len)


def test_full_rows_keep_their_lengths_the_others_get_zero():
    s, calls = _schedule()
    fr = _step(s, [100, 300, 128, 129, 5])
    assert fr.seq_lens.tolist() == [100, 0, 128, 0, 5]
    assert fr.seq_lens.data_ptr() == s.lens.data_ptr()  # the builder's buffer, every step
    (kw,) = calls
    assert kw["cache_seqlens"].tolist() == [100, 0, 128, 0, 5]
    assert kw["batch_size"] == 5 and kw["max_seqlen_q"] == 1 and kw["causal"] is True
    assert kw["cu_seqlens_q"].tolist() == [0, 1, 2, 3, 4, 5]
    assert (kw["num_heads_q"], kw["num_heads_kv"], kw["headdim"], kw["page_size"]) == (
        8, 2, 64, PAGE)
    assert kw["max_seqlen_k"] == 128  # the bound on full rows, below the batch's 300
    assert fr.num_splits == 32 and kw["num_splits"] == 32


def test_schedule_is_sized_by_this_step_when_the_rows_are_short():
    s, calls = _schedule()
    _step(s, [40, 60])
    assert calls[0]["max_seqlen_k"] == 60  # not the 128-token bound: FA3 splits for 60
    s, calls = _schedule(max_model_len=100)
    _step(s, [40, 300], max_seq_len=300)
    assert calls[0]["max_seqlen_k"] == 100  # never past the model's length


def test_cuda_graph_buffer_gets_the_schedule_and_a_zeroed_tail():
    s, _ = _schedule()
    s.sched.fill_(-3)  # a previous, larger batch's entries
    fr = _step(s, [100, 300])  # batch 2: 1 + 4 * 1 = 5 entries
    assert fr.scheduler_metadata.data_ptr() == s.sched.data_ptr()
    assert fr.scheduler_metadata.tolist() == [5] * 5
    assert s.sched[5:].eq(0).all()  # no stale entry left for the kernel's blocks to read


@pytest.mark.parametrize("full_cuda_graphs, capture, batch, splits", [
    (True, 8, 4, 32), (True, 2, 4, 0), (False, 8, 4, 0)])
def test_num_splits_bounded_only_for_captured_batches(full_cuda_graphs, capture, batch, splits):
    s, calls = _schedule(full_cuda_graphs=full_cuda_graphs, capture=capture)
    fr = _step(s, [100] * batch)
    assert fr.num_splits == splits and calls[0]["num_splits"] == splits
    assert (s.sched is not None) is full_cuda_graphs
    if not full_cuda_graphs:  # eager: the scheduler's own tensor, no persistent buffer
        assert fr.scheduler_metadata.tolist() == [5] * 5


def test_without_fa3_scheduler_only_the_lengths():
    s, _ = _schedule(scheduler=False)
    fr = _step(s, [100, 300])
    assert fr.scheduler_metadata is None and s.sched is None
    assert fr.seq_lens.tolist() == [100, 0]


@pytest.mark.parametrize("cfg", [SparseConfig(), SparseConfig(decode_dense_rows="triton"),
                                 SparseConfig(decode_dense_rows="engine", decode_overlap=False)])
def test_no_schedule_when_ours_attends_the_full_rows(cfg):
    assert make_full_rows_schedule(cfg, None, page_size=PAGE, num_heads_q=8, num_heads_kv=2,
                                   head_size=64, max_seqs=8, device=torch.device("cpu")) is None


def test_short_engine_makes_a_schedule_without_overlap():
    """decode_dense_rows=engine in an engine where every row is full (all_full): the schedule
    exists with decode_overlap off too (the whole decode is dense); "triton" still makes none."""
    from types import SimpleNamespace as NS

    vc = NS(compilation_config=NS(cudagraph_mode=None, max_cudagraph_capture_size=None),
            attention_config=None, model_config=NS(dtype=torch.bfloat16, max_model_len=100))
    kw = dict(page_size=PAGE, num_heads_q=8, num_heads_kv=2, head_size=64, max_seqs=8,
              device=torch.device("cpu"))
    cfg = SparseConfig(decode_dense_rows="engine", decode_overlap=False)
    assert make_full_rows_schedule(cfg, vc, **kw) is None
    short = make_full_rows_schedule(cfg, vc, all_full=True, **kw)
    assert short is not None
    assert short.q_lens is None  # every row FA3's: vLLM's own call, no seqused_q (any device)
    assert make_full_rows_schedule(SparseConfig(decode_dense_rows="triton"), vc, all_full=True,
                                   **kw) is None


def test_made_from_the_vllm_config():
    """make_full_rows_schedule reads vLLM's settings as its FLASH_ATTN builder does: full CUDA
    graphs, the capture size, flash_attn_max_num_splits_for_cuda_graph, the model's dtype and
    length (on the CPU there is no FA3 scheduler: lengths only; on a GPU, FA3's own)."""
    from types import SimpleNamespace as NS

    mode = NS(has_full_cudagraphs=lambda: True)
    vc = NS(compilation_config=NS(cudagraph_mode=mode, max_cudagraph_capture_size=6),
            attention_config=NS(flash_attn_max_num_splits_for_cuda_graph=16),
            model_config=NS(dtype=torch.bfloat16, max_model_len=100))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = make_full_rows_schedule(CFG, vc, page_size=PAGE, num_heads_q=8, num_heads_kv=2,
                                head_size=64, max_seqs=8, device=torch.device(dev))
    assert s.full_cuda_graphs and s.max_cudagraph_size == 6
    assert s.max_num_splits_for_cuda_graph == 16 and s.bound == 100
    assert s.kv_dtype == torch.bfloat16 and s.lens.shape == (8,)
    fr = _step(s, [90, 300], max_seq_len=300, device=dev)
    assert fr.seq_lens.tolist() == [90, 0] and fr.num_splits == 16
    if s.get_scheduler_metadata is None:  # no FA3 here
        assert fr.scheduler_metadata is None and s.sched is None
    else:  # FA3's scheduler; with seqused_q where its ops take it (vLLM 0.26)
        assert fr.scheduler_metadata.data_ptr() == s.sched.data_ptr()
        assert fr.q_lens is None or fr.q_lens.tolist() == [1, 0]


def test_a_scheduler_that_returns_nothing_leaves_the_buffer_alone():
    """vLLM's ROCm fa_utils stands in get_scheduler_metadata with a function returning None."""
    s = FullRowsSchedule(CFG, page_size=PAGE, num_heads_q=8, num_heads_kv=2, head_size=64,
                         kv_dtype=torch.bfloat16, max_seqs=8, max_model_len=4096,
                         full_cuda_graphs=True, max_cudagraph_size=8,
                         max_num_splits_for_cuda_graph=32, device=torch.device("cpu"),
                         get_scheduler_metadata=lambda **kw: None)
    fr = _step(s, [100, 300])
    assert fr.scheduler_metadata is None and fr.seq_lens.tolist() == [100, 0]


def test_masked_schedule_gives_fa3_one_query_per_full_or_empty_row():
    """With FA3's seqused_q (masked): 1 query for a full row and for an empty (padding) row,
    none for the others, in the builder's buffer, and the scheduler gets the same tensor."""
    s, calls = _schedule(masked=True)
    fr = _step(s, [100, 300, 0, 128, 129])
    assert fr.seq_lens.tolist() == [100, 0, 0, 128, 0]
    assert fr.q_lens.tolist() == [1, 0, 1, 1, 0]
    assert fr.q_lens.data_ptr() == s.q_lens.data_ptr()
    assert calls[0]["seqused_q"].data_ptr() == fr.q_lens.data_ptr()
    s, calls = _schedule()  # unmasked: no q_lens, the scheduler gets no seqused_q
    fr = _step(s, [100, 300])
    assert fr.q_lens is None and "seqused_q" not in calls[0]


class _Op:
    """A stand-in torch op: a schema of (name, optional?) arguments; records its call."""

    def __init__(self, *args):
        from types import SimpleNamespace as NS

        opt, req = torch.OptionalType(torch.TensorType.get()), torch.IntType.get()
        self.default = NS(_schema=NS(arguments=[NS(name=n, type=opt if o else req)
                                                for n, o in args]))
        self.got = None

    def __call__(self, **kw):
        self.got = kw
        return "result"


def test_schema_call_fills_arguments_by_name():
    from vllm_sparse.full_rows_fa import _schema_call

    op = _Op(("q", False), ("k_new", True), ("softcap", False), ("seqused_q", True))
    assert _schema_call(op, dict(q=1, seqused_q=2)) == "result"
    assert op.got == dict(q=1, k_new=None, softcap=0.0, seqused_q=2)
    with pytest.raises(TypeError, match="new_required"):  # a signature it does not know
        _schema_call(_Op(("q", False), ("new_required", False)), dict(q=1))


def test_schema_fits_only_ops_it_can_call():
    from vllm_sparse.full_rows_fa import _schema_fits

    ok = _Op(("q", False), ("seqused_q", True), ("seqused_k", True), ("softcap", False))
    assert _schema_fits(ok, {"q"})
    assert not _schema_fits(ok, set())  # q required, not given
    assert not _schema_fits(_Op(("q", False), ("seqused_k", True)), {"q"})  # no seqused_q


def test_masked_scheduler_metadata_maps_vllm_names_to_the_op():
    from vllm_sparse.full_rows_fa import fa3_masked_scheduler_metadata

    names = ["batch_size", "max_seqlen_q", "max_seqlen_k", "num_heads", "num_heads_k",
             "headdim", "headdim_v", "qkv_dtype", "seqused_k", "cu_seqlens_q", "seqused_q",
             "page_size", "max_seqlen_k_new", "is_causal", "window_size_left", "num_splits",
             "pack_gqa"]
    op = _Op(*[(n, n in ("seqused_q", "pack_gqa", "cu_seqlens_q")) for n in names])
    s, _ = _schedule(masked=True)
    s.get_scheduler_metadata = fa3_masked_scheduler_metadata(op)
    s.sched = None
    fr = _step(s, [100, 300])
    got = op.got
    assert (got["num_heads"], got["num_heads_k"], got["headdim"], got["headdim_v"]) == (
        8, 2, 64, 64)
    assert got["seqused_k"].tolist() == [100, 0] and got["seqused_q"].tolist() == [1, 0]
    assert got["is_causal"] is True and got["window_size_left"] == -1
    assert got["max_seqlen_q"] == 1 and got["num_splits"] == 32 and got["pack_gqa"] is None
    assert fr.scheduler_metadata == "result"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FA3 needs a GPU")
@pytest.mark.parametrize("aot", [False, True])
@pytest.mark.parametrize("others_keep_lengths", [False, True])
def test_fa3_with_seqused_q_writes_only_its_rows(aot, others_keep_lengths):
    """On a GPU: FA3 called with seqused_q attends the rows with 1 (to dense attention's
    bf16 tolerance; an empty row gets zeros) and leaves the rows with 0 untouched, with or
    without the ahead-of-time schedule, whether those rows' seqused_k is 0 (as the backend
    passes) or their real length."""
    from sparse_kernels import reference
    from vllm_sparse.full_rows_fa import fa3_decode_rows, fa3_masked_ops

    ops = fa3_masked_ops()
    if ops is None:
        assert vllm.__version__ != "0.26.0", "vLLM 0.26's FA3 ops take seqused_q"
        pytest.skip("this vLLM's FA3 ops take no seqused_q (or changed their signature)")
    hq, hkv, d, page = 32, 8, 128, 16
    lens = [300, 5000, 4096, 50, 0, 2000, 1, 777]
    q_lens = [1, 0, 1, 0, 1, 1, 1, 0]
    k, v, bt = reference.random_paged_kv(lens, hkv, d, page,
                                         generator=torch.Generator().manual_seed(0))
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    ql = torch.tensor(q_lens, dtype=torch.int32)
    ref = reference.dense_attention(q, k, v, bt, qsl, sl, d ** -0.5)
    dev = "cuda"
    qg, kg, vg = (x.to(dev, torch.bfloat16) for x in (q, k, v))
    btg, qslg, qlg = bt.to(dev), qsl.to(dev), ql.to(dev)
    slg = (sl if others_keep_lengths else sl * ql).to(dev)
    meta, splits = None, 0
    if aot:
        from vllm_sparse.full_rows_fa import fa3_masked_scheduler_metadata

        splits = 32
        meta = fa3_masked_scheduler_metadata(ops[1])(
            batch_size=len(lens), max_seqlen_q=1, max_seqlen_k=max(lens), num_heads_q=hq,
            num_heads_kv=hkv, headdim=d, cache_seqlens=slg, qkv_dtype=torch.bfloat16,
            cu_seqlens_q=qslg, page_size=page, causal=True, num_splits=splits, seqused_q=qlg)
    out = torch.full_like(qg, float("nan"))
    fa3_decode_rows(ops[0], qg, kg, vg, out, qslg, qlg, slg, max(lens), btg, d ** -0.5,
                    scheduler_metadata=meta, num_splits=splits)
    torch.cuda.synchronize()
    out = out.float().cpu()
    for b, (n, used) in enumerate(zip(lens, q_lens)):
        if not used:
            assert out[b].isnan().all(), b
        elif n == 0:
            assert out[b].eq(0).all(), b
        else:
            torch.testing.assert_close(out[b], ref[b], rtol=2e-2, atol=2e-2)

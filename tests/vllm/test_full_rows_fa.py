"""vllm_sparse.full_rows_fa: the once-per-step inputs of vLLM's FlashAttention for the decode
rows that read every page (SPARSE_DECODE_DENSE_ROWS=engine|auto), as vLLM's FLASH_ATTN builder
makes its ahead-of-time FA3 schedule. FA3's scheduler is replaced by a recording stand-in."""

import pytest
import torch

pytest.importorskip("vllm")

from sparse_kernels.config import SparseConfig  # noqa: E402
from vllm_sparse.full_rows_fa import FullRowsSchedule, make_full_rows_schedule  # noqa: E402

PAGE = 16
# budget 64 tokens (4 pages); rows of at most 2 x 64 = 128 tokens (8 pages) read every page
CFG = SparseConfig(token_budget=64, sink_tokens=16, local_tokens=16, decode_dense_rows="engine")


def _schedule(full_cuda_graphs=True, capture=8, scheduler=True, max_model_len=4096):
    calls = []

    def get_scheduler_metadata(**kw):
        calls.append(kw)
        return torch.full((1 + 4 * ((kw["batch_size"] + 3) // 4),), 5, dtype=torch.int32)

    s = FullRowsSchedule(CFG, page_size=PAGE, num_heads_q=8, num_heads_kv=2, head_size=64,
                         kv_dtype=torch.bfloat16, max_seqs=8, max_model_len=max_model_len,
                         full_cuda_graphs=full_cuda_graphs, max_cudagraph_size=capture,
                         max_num_splits_for_cuda_graph=32, device=torch.device("cpu"),
                         get_scheduler_metadata=get_scheduler_metadata if scheduler else None)
    return s, calls


def _step(s, lens, max_seq_len=None):
    seq = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
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
    assert make_full_rows_schedule(cfg, vc, all_full=True, **kw) is not None
    assert make_full_rows_schedule(SparseConfig(decode_dense_rows="triton"), vc, all_full=True,
                                   **kw) is None


def test_made_from_the_vllm_config():
    """make_full_rows_schedule reads vLLM's settings as its FLASH_ATTN builder does: full CUDA
    graphs, the capture size, flash_attn_max_num_splits_for_cuda_graph, the model's dtype and
    length (on the CPU there is no FA3 scheduler: lengths only)."""
    from types import SimpleNamespace as NS

    mode = NS(has_full_cudagraphs=lambda: True)
    vc = NS(compilation_config=NS(cudagraph_mode=mode, max_cudagraph_capture_size=6),
            attention_config=NS(flash_attn_max_num_splits_for_cuda_graph=16),
            model_config=NS(dtype=torch.bfloat16, max_model_len=100))
    s = make_full_rows_schedule(CFG, vc, page_size=PAGE, num_heads_q=8, num_heads_kv=2,
                                head_size=64, max_seqs=8, device=torch.device("cpu"))
    assert s.full_cuda_graphs and s.max_cudagraph_size == 6
    assert s.max_num_splits_for_cuda_graph == 16 and s.bound == 100
    assert s.kv_dtype == torch.bfloat16 and s.lens.shape == (8,)
    fr = _step(s, [90, 300], max_seq_len=300)
    assert fr.seq_lens.tolist() == [90, 0] and fr.num_splits == 16
    if s.get_scheduler_metadata is None:  # no FA3 here
        assert fr.scheduler_metadata is None and s.sched is None


def test_a_scheduler_that_returns_nothing_leaves_the_buffer_alone():
    """vLLM's ROCm fa_utils stands in get_scheduler_metadata with a function returning None."""
    s = FullRowsSchedule(CFG, page_size=PAGE, num_heads_q=8, num_heads_kv=2, head_size=64,
                         kv_dtype=torch.bfloat16, max_seqs=8, max_model_len=4096,
                         full_cuda_graphs=True, max_cudagraph_size=8,
                         max_num_splits_for_cuda_graph=32, device=torch.device("cpu"),
                         get_scheduler_metadata=lambda **kw: None)
    fr = _step(s, [100, 300])
    assert fr.scheduler_metadata is None and fr.seq_lens.tolist() == [100, 0]

"""vLLM's FlashAttention for the decode rows that read every page
(``SPARSE_DECODE_DENSE_ROWS=engine|auto``), prepared once per step by the metadata builder.

Those rows' lengths (every other row set to 0) are built once per step instead of once per
layer, and on FA3 the launch gets an ahead-of-time schedule, as vLLM's own FLASH_ATTN builder
makes it (``get_scheduler_metadata`` from this step's lengths and maximum; with full CUDA
graphs a persistent buffer whose tail is zeroed, and ``num_splits`` bounded by
``flash_attn_max_num_splits_for_cuda_graph``). Without it FA3 sizes its splits from the static
bound on those rows (``decode_full_pages``: 16K tokens at the default budget), which in an
engine of long contexts is up to four times the 4K rows it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_kernels.config import SparseConfig
from sparse_kernels.pipeline import (
    decode_full_pages,
    engine_dense_rows_enabled,
    full_row_seq_lens,
)


@dataclass(frozen=True)
class FullRowsFA:
    """One step's inputs of :func:`vllm_sparse.backend._dense_decode_rows`."""

    seq_lens: torch.Tensor  # int32 [num_decodes]: the rows that read every page; others 0
    scheduler_metadata: torch.Tensor | None  # FA3 ahead-of-time schedule, or None
    num_splits: int  # 0: FA's heuristic (eager); else the CUDA-graph bound


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class FullRowsSchedule:
    """Per-builder buffers and the per-step :meth:`prepare`.

    ``get_scheduler_metadata``: FA3's scheduler function (``None``: no ahead-of-time schedule,
    e.g. FA2); passed in so that tests can stand in for it."""

    def __init__(self, cfg: SparseConfig, *, page_size: int, num_heads_q: int,
                 num_heads_kv: int, head_size: int, kv_dtype: torch.dtype, max_seqs: int,
                 max_model_len: int, full_cuda_graphs: bool, max_cudagraph_size: int | None,
                 max_num_splits_for_cuda_graph: int, device: torch.device,
                 get_scheduler_metadata=None):
        self.cfg = cfg
        self.page_size = page_size
        self.num_heads_q, self.num_heads_kv, self.head_size = num_heads_q, num_heads_kv, head_size
        self.kv_dtype = kv_dtype
        self.bound = min(decode_full_pages(cfg, page_size) * page_size, max_model_len)
        self.lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.get_scheduler_metadata = get_scheduler_metadata
        self.full_cuda_graphs = full_cuda_graphs
        self.max_cudagraph_size = max_cudagraph_size
        self.max_num_splits_for_cuda_graph = max_num_splits_for_cuda_graph
        # FA3's metadata: 1 + round_up(batch, 4) * 4 int32 (vLLM's flash_attn.py builder)
        self.sched = (torch.zeros(1 + _round_up(max_seqs, 4) * 4, dtype=torch.int32,
                                  device=device)
                      if full_cuda_graphs and get_scheduler_metadata is not None else None)

    def prepare(self, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_decodes: int,
                max_seq_len: int) -> FullRowsFA:
        """This step's lengths and schedule for the first ``num_decodes`` rows (the decodes);
        ``max_seq_len``: the batch's host maximum (vLLM's metadata)."""
        nd = num_decodes
        lens = full_row_seq_lens(self.cfg, seq_lens[:nd], self.page_size, out=self.lens[:nd])
        num_splits = 0  # as vLLM: FA's own heuristic outside full CUDA graphs
        if (self.full_cuda_graphs and self.max_cudagraph_size is not None
                and nd <= self.max_cudagraph_size):
            num_splits = self.max_num_splits_for_cuda_graph
        meta = None
        if self.get_scheduler_metadata is not None:
            meta = self.get_scheduler_metadata(
                batch_size=nd, max_seqlen_q=1, max_seqlen_k=max(1, min(self.bound, max_seq_len)),
                num_heads_q=self.num_heads_q, num_heads_kv=self.num_heads_kv,
                headdim=self.head_size, cache_seqlens=lens, qkv_dtype=self.kv_dtype,
                cu_seqlens_q=query_start_loc[:nd + 1], page_size=self.page_size, causal=True,
                num_splits=num_splits)
            if meta is not None and self.sched is not None:  # (ROCm's stand-in returns None)
                n = meta.shape[0]
                self.sched[:n] = meta
                self.sched[n:] = 0  # (vLLM: stale entries would let blocks write the output)
                meta = self.sched[:n]
        return FullRowsFA(lens, meta, num_splits)


def make_full_rows_schedule(cfg: SparseConfig, vllm_config, *, page_size: int, num_heads_q: int,
                            num_heads_kv: int, head_size: int, max_seqs: int,
                            device: torch.device, all_full: bool = False
                            ) -> FullRowsSchedule | None:
    """The builder's schedule when some decode rows may go to vLLM's FlashAttention
    (``decode_dense_rows`` engine or auto, with ``decode_overlap`` or ``all_full``: see
    :func:`~sparse_kernels.pipeline.engine_dense_rows_enabled`), else ``None``."""
    if not engine_dense_rows_enabled(cfg, all_full):
        return None
    from vllm_sparse.backend import _fa_version

    get_meta = None
    if _fa_version() == 3:
        try:
            from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata as get_meta
        except ImportError:  # a vLLM without it: FA's own heuristic, as before
            get_meta = None
    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    full_cg = bool(mode is not None and mode.has_full_cudagraphs())
    att = getattr(vllm_config, "attention_config", None)
    return FullRowsSchedule(
        cfg, page_size=page_size, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv,
        head_size=head_size, kv_dtype=vllm_config.model_config.dtype, max_seqs=max_seqs,
        max_model_len=vllm_config.model_config.max_model_len, full_cuda_graphs=full_cg,
        max_cudagraph_size=cc.max_cudagraph_capture_size,
        max_num_splits_for_cuda_graph=getattr(att, "flash_attn_max_num_splits_for_cuda_graph",
                                              32),
        device=device, get_scheduler_metadata=get_meta)

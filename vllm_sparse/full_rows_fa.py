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

import functools
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
    # int32 [num_decodes]: 1 for those rows and empty (padding) ones, 0 for the others (FA3's
    # seqused_q: FA3 then writes only those rows, and runs beside the others' attention);
    # None: FA3 writes every row, and the others' attention is ordered after it
    q_lens: torch.Tensor | None = None


# SMs FA3's persistent launch for the full rows leaves free (FA3's sm_margin), so that the
# selection beside it finds some; 0: as FLASH_ATTN.
SM_MARGIN = 0
# Arguments of FA3's ops that the masked-rows call leaves at what vLLM's own wrapper passes
# (``vllm.vllm_flash_attn.flash_attn_varlen_func``, decode without rotary, softcap or sinks).
_FA3_FIXED = dict(softcap=0.0, is_causal=True, window_size_left=-1, window_size_right=-1,
                  is_rotary_interleaved=True, cp_world_size=1, cp_rank=0,
                  has_softcap=False, pack_gqa=None)


def _schema_call(op, given: dict):
    """Call a torch op by its schema's argument names: ``given``, then :data:`_FA3_FIXED`,
    then ``None`` for optional arguments. Raises TypeError for a required argument it cannot
    fill (an op whose signature changed)."""
    kwargs = {}
    for a in op.default._schema.arguments:
        if a.name in given:
            kwargs[a.name] = given[a.name]
        elif a.name in _FA3_FIXED:
            kwargs[a.name] = _FA3_FIXED[a.name]
        elif isinstance(a.type, torch.OptionalType):
            kwargs[a.name] = None
        else:
            raise TypeError(f"{op}: no value for argument {a.name!r}")
    return op(**kwargs)


# The arguments fa3_decode_rows and fa3_masked_scheduler_metadata give FA3's two ops by name.
_FWD_GIVEN = {"q", "k", "v", "out", "cu_seqlens_q", "seqused_q", "seqused_k", "max_seqlen_q",
              "max_seqlen_k", "page_table", "softmax_scale", "scheduler_metadata", "num_splits",
              "sm_margin"}
_META_GIVEN = {"batch_size", "max_seqlen_q", "max_seqlen_k", "num_heads", "num_heads_k",
               "headdim", "headdim_v", "qkv_dtype", "seqused_k", "cu_seqlens_q", "seqused_q",
               "page_size", "max_seqlen_k_new", "is_causal", "num_splits", "sm_margin"}


def _schema_fits(op, given: set[str]) -> bool:
    """Whether :func:`_schema_call` can call ``op`` with ``given`` (checked once, at start-up,
    so that a changed signature falls back instead of failing in a forward)."""
    args = op.default._schema.arguments
    names = {a.name for a in args}
    return {"seqused_q", "seqused_k"} <= names and all(
        a.name in given or a.name in _FA3_FIXED or isinstance(a.type, torch.OptionalType)
        for a in args)


@functools.cache
def fa3_masked_ops():
    """vLLM's FA3 forward and scheduler ops where both take ``seqused_q`` and every argument
    they require is one :func:`fa3_decode_rows` and :func:`fa3_masked_scheduler_metadata`
    give (vLLM 0.26's ``_vllm_fa3_C``), else ``None``: FA3 for the full rows then writes every
    row, through vLLM's own wrapper."""
    try:
        import vllm.vllm_flash_attn  # noqa: F401  (loads the ops)

        fwd = torch.ops._vllm_fa3_C.fwd
        meta = torch.ops._vllm_fa3_C.get_scheduler_metadata
        fits = _schema_fits(fwd, _FWD_GIVEN) and _schema_fits(meta, _META_GIVEN)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return (fwd, meta) if fits else None


def fa3_decode_rows(fwd, q, key_cache, value_cache, out, cu_seqlens_q, q_lens, seq_lens,
                    max_seqlen_k: int, block_table, scale: float, scheduler_metadata=None,
                    num_splits: int = 0) -> None:
    """FA3 decode of the rows with ``q_lens`` 1 (0: a row FA3 neither reads nor writes)."""
    _schema_call(fwd, dict(
        q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q,
        seqused_q=q_lens, seqused_k=seq_lens, max_seqlen_q=1, max_seqlen_k=max_seqlen_k,
        page_table=block_table, softmax_scale=scale, scheduler_metadata=scheduler_metadata,
        num_splits=num_splits, sm_margin=SM_MARGIN))


def fa3_masked_scheduler_metadata(meta_op):
    """FA3's ahead-of-time schedule for :func:`fa3_decode_rows`: a function of the keyword
    arguments of vLLM's ``get_scheduler_metadata`` (what :class:`FullRowsSchedule` passes)
    plus ``seqused_q`` (the same ``q_lens``), calling ``meta_op`` by name."""
    def get(*, batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
            cache_seqlens, qkv_dtype, cu_seqlens_q, page_size, causal, num_splits, seqused_q):
        return _schema_call(meta_op, dict(
            batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            num_heads=num_heads_q, num_heads_k=num_heads_kv, headdim=headdim,
            headdim_v=headdim, qkv_dtype=qkv_dtype, seqused_k=cache_seqlens,
            cu_seqlens_q=cu_seqlens_q, seqused_q=seqused_q, page_size=page_size,
            max_seqlen_k_new=0, is_causal=causal, num_splits=num_splits, sm_margin=SM_MARGIN))
    return get


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class FullRowsSchedule:
    """Per-builder buffers and the per-step :meth:`prepare`.

    ``get_scheduler_metadata``: FA3's scheduler function (``None``: no ahead-of-time schedule,
    e.g. FA2); passed in so that tests can stand in for it. ``masked``: FA3 is called with
    ``seqused_q`` (:func:`fa3_decode_rows`; each step gets ``q_lens``, which the scheduler
    function gets too, as ``seqused_q``)."""

    def __init__(self, cfg: SparseConfig, *, page_size: int, num_heads_q: int,
                 num_heads_kv: int, head_size: int, kv_dtype: torch.dtype, max_seqs: int,
                 max_model_len: int, full_cuda_graphs: bool, max_cudagraph_size: int | None,
                 max_num_splits_for_cuda_graph: int, device: torch.device,
                 get_scheduler_metadata=None, masked: bool = False):
        self.cfg = cfg
        self.page_size = page_size
        self.num_heads_q, self.num_heads_kv, self.head_size = num_heads_q, num_heads_kv, head_size
        self.kv_dtype = kv_dtype
        self.max_full = decode_full_pages(cfg, page_size) * page_size  # longest full row
        self.bound = min(self.max_full, max_model_len)
        self.lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.q_lens = (torch.zeros(max_seqs, dtype=torch.int32, device=device) if masked
                       else None)
        self.q_full = (torch.zeros(max_seqs, dtype=torch.bool, device=device) if masked
                       else None)
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
        q_lens, masked = None, {}
        if self.q_lens is not None:  # 1 query for a full (or empty) row, none for the others
            full = torch.le(seq_lens[:nd], self.max_full, out=self.q_full[:nd])
            q_lens = self.q_lens[:nd].copy_(full)
            masked = dict(seqused_q=q_lens)
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
                num_splits=num_splits, **masked)
            if meta is not None and self.sched is not None:  # (ROCm's stand-in returns None)
                n = meta.shape[0]
                self.sched[:n] = meta
                self.sched[n:] = 0  # (vLLM: stale entries would let blocks write the output)
                meta = self.sched[:n]
        return FullRowsFA(lens, meta, num_splits, q_lens)


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

    get_meta, masked = None, False
    if _fa_version() == 3:
        # seqused_q only where FA3 runs beside the selection; an engine whose every row is
        # full runs FA3 as FLASH_ATTN does (vLLM's wrapper), over every row
        ops = None if all_full else fa3_masked_ops()
        if ops is not None:
            get_meta, masked = fa3_masked_scheduler_metadata(ops[1]), True
        else:
            try:
                from vllm.v1.attention.backends.fa_utils import (
                    get_scheduler_metadata as get_meta,
                )
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
        device=device, get_scheduler_metadata=get_meta, masked=masked)

"""The sparse-serve attention backend for vLLM V1: backend, metadata builder, impl.

It lives on vLLM's own paged KV cache, in the FlashAttention layout of vLLM 0.26 (logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K and V interleaved), and adds one side
buffer per layer: Quest page summaries ``[num_blocks, 2, num_kv_heads, head_size]`` (min and max
key per page), i.e. ``1 / block_size`` of the layer's KV cache (6.25 % at block size 16).

The KV write (``do_kv_cache_update``, before forward) of a top-k decode layer is our own launch
(:mod:`sparse_kernels.kv_write`): it writes K/V as vLLM's ``reshape_and_cache_flash`` does and
re-summarizes each page that one token of the step writes (every decode token's page).

Every forward:

1. when the step has prefill chunks, updates the summaries of the pages this step wrote (vLLM
   wrote K/V just before);
2. decode requests (the batch is reordered decode-first) run top-k page selection and split-KV
   paged decode over the selected pages (every page, unscored, for sequences of at most
   ``decode_min_seq_len`` tokens) -- static shapes, so pure-decode batches run inside vLLM's
   full CUDA graphs, with no separate summary launch;
3. prefill chunks of sequences of at most ``min_seq_len`` tokens run dense FlashAttention-3 (the
   same kernel as vLLM's FLASH_ATTN backend); longer ones run the configured estimator and the
   block-sparse prefill kernel. Consecutive requests of one kind share one launch.

Which path ran is counted per process and logged every ``LOG_EVERY_S`` seconds.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

from sparse_kernels.config import SparseConfig, SparseConfigError, get_config
from vllm_sparse import metrics

logger = logging.getLogger("vllm.sparse_serve")

# How often the path/density summary is logged (benchmarks set it lower).
LOG_EVERY_S = float(os.environ.get("SPARSE_SERVE_STATS_EVERY_S", "60"))
_logged_config = False


def vllm_sparse_config(vllm_config: VllmConfig | None = None) -> SparseConfig:
    """The process-wide SparseConfig, with ``--additional-config '{"sparse": {...}}'``."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config

        try:
            vllm_config = get_current_vllm_config()
        except Exception:  # no current config (unit tests construct classes directly)
            vllm_config = None
    additional = getattr(vllm_config, "additional_config", None) or {}
    overrides = None
    if isinstance(additional, dict) and "sparse" in additional:
        overrides = additional["sparse"]
        if not isinstance(overrides, dict):
            raise SparseConfigError(
                "--additional-config key 'sparse' must be an object, e.g. "
                "'{\"sparse\": {\"token_budget\": 4096}}'")
    cfg = get_config(overrides)  # --additional-config values validated too
    global _logged_config
    if not _logged_config:
        _logged_config = True
        logger.info("sparse-serve config: %s", cfg.summary())
    return cfg


# --------------------------------------------------------------------------- metadata


@dataclass
class PrefillRun:
    """Consecutive prefill requests that take the same path (one launch)."""

    sparse: bool
    tok_start: int
    tok_end: int
    req_start: int
    req_end: int
    query_start_loc: torch.Tensor  # int32 [n + 1], rebased to 0, device
    seq_lens: torch.Tensor  # int32 [n], device view
    block_table: torch.Tensor  # int32 [n, max_pages], device view
    max_query_len: int
    max_seq_len: int
    block_meta: object | None = None  # PrefillBlockMeta for sparse runs
    causal_blocks: torch.Tensor | None = None  # device scalar: causal block pairs, sparse runs


@dataclass
class SparseAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    num_decode_tokens: int
    prefill_runs: list[PrefillRun] = field(default_factory=list)
    # Preallocated decode buffers (shared by all layers of the step).
    selected: torch.Tensor | None = None
    workspace: object | None = None
    select_workspace: object | None = None
    # The selection runs on it beside the rows that read every page (SparseConfig.decode_overlap).
    side_stream: torch.cuda.Stream | None = None
    # This step's inputs of vLLM's FlashAttention for the decode rows that read every page
    # (decode_dense_rows engine/auto on this batch), else None: ours attends them.
    full_rows: object | None = None
    # Every decode row reads every page in this engine (short max_model_len): decode is dense.
    decode_all_full: bool = False
    # The first this many requests are decode rows that read every page, attended by the
    # first (dense) prefill run's FlashAttention launch (eager batches with prefill rows);
    # num_decodes counts the others (0).
    folded_decodes: int = 0
    # Selection reuse (SparseConfig.selection_reuse > 1): int32 flags per decode row, 1 where
    # the row keeps the page selection an earlier step stored in each layer's own buffer
    # (sparse_kernels.selection_reuse; written by the builder, once per step); else None.
    reuse_keep: torch.Tensor | None = None
    # No cascade attention; vLLM's runner reads this.
    use_cascade: bool = False
    causal: bool = True


class _PathCounters:
    """Which path requests took (host counts) and how sparse they were (device sums).

    The device sums are accumulated in place (CUDA-graph safe): ``[KV tokens read by decode,
    KV tokens in those sequences, prefill blocks computed, prefill causal blocks]`` summed over
    (sequence, KV head). Prefill blocks are summed over every layer (their density differs per
    layer and head_config may keep some layers dense). Decode is measured on one layer only,
    the first top-k one (more launches in every layer of a captured decode step would cost
    decode time): every top-k layer reads the same number of tokens (same budget, sink and
    local pages, same sequences) and a dense-decode layer reads all it holds, so
    :meth:`snapshot` weights that layer's two sums by the layers of each kind that this process
    runs (``decode_layers``, filled by the layers' first forward). They are read, one host
    sync, when the summary is logged every ``LOG_EVERY_S`` seconds.
    """

    def __init__(self) -> None:
        self.sparse_prefill_reqs = 0
        self.dense_prefill_reqs = 0
        self.decode_steps = 0
        # prefill chunks whose estimated density exceeded prefill_dense_above (counted on the
        # first layer with a sparse prefill method)
        self.prefill_dense_fallbacks = 0
        self.device_sums: torch.Tensor | None = None
        # selection reuse: [decode rows that kept a stored selection, decode rows] (fp64
        # device counters, written by the builder's reuse update; None while reuse is off)
        self.reuse_sums: torch.Tensor | None = None
        # layer index -> decode method, of the attention layers this process runs (not reset:
        # the model's layers do not change)
        self.decode_layers: dict[int | None, str] = {}
        self._last = time.monotonic()
        self._last_write = float("-inf")  # the first report writes, whatever the uptime
        # Only one process per engine writes the metrics file (tensor-parallel rank 0).
        self.write_metrics = True
        # True from the moment the warm-up hook is in place until vLLM's warm-up returns:
        # start-up batches are neither logged nor written as metrics.
        self.starting_up = False

    def reset(self) -> None:
        """Forget what was counted so far: vLLM's start-up batches (warm-up and CUDA-graph
        capture runs of made-up requests) go through the same builder as real ones; the
        builder resets the counts at every capture, so after the last one only served
        requests count."""
        self.sparse_prefill_reqs = self.dense_prefill_reqs = 0
        self.decode_steps = self.prefill_dense_fallbacks = 0
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        # In place (CUDA graphs captured so far add into these very tensors). They were made
        # inside vLLM's inference mode, and an inference tensor can only be written to in
        # inference mode: the worker's warm-up hook calls this outside it. (The reuse counters
        # are made by the builder, the others by the first forward: either may exist alone.)
        with torch.inference_mode():
            for sums in (self.device_sums, self.reuse_sums):
                if sums is not None:
                    sums.zero_()

    def sums_for(self, device: torch.device) -> torch.Tensor:
        if self.device_sums is None:
            self.device_sums = torch.zeros(4, dtype=torch.float64, device=device)
        return self.device_sums

    def reuse_sums_for(self, device: torch.device) -> torch.Tensor:
        if self.reuse_sums is None:
            self.reuse_sums = torch.zeros(2, dtype=torch.float64, device=device)
        return self.reuse_sums

    def layer_weighted(self, raw: list[float]) -> list[float]:
        """The device sums with the decode pair over every layer: ``[n_topk * read + n_dense *
        held, n * held, ...]`` (one layer's measurement when no layer is registered)."""
        n_topk = sum(m == "topk" for m in self.decode_layers.values())
        n_dense = len(self.decode_layers) - n_topk  # (with no top-k layer, the measured layer
        # decodes dense: read == held, and every layer counts as that)
        if not self.decode_layers:
            n_topk, n_dense = 1, 0
        read, held = raw[0], raw[1]
        return [n_topk * read + n_dense * held, (n_topk + n_dense) * held, raw[2], raw[3]]

    def snapshot(self) -> dict:
        raw = [0.0] * 4 if self.device_sums is None else self.device_sums.tolist()
        sums = self.layer_weighted(raw)
        snap = {
            "prefill_chunks_sparse": self.sparse_prefill_reqs,
            "prefill_chunks_dense": self.dense_prefill_reqs,
            "prefill_chunks_dense_fallback": self.prefill_dense_fallbacks,
            "decode_steps": self.decode_steps,
            **metrics.fractions_from_sums(sums),
            "device_sums": sums,
        }
        if self.reuse_sums is not None:
            kept, rows = self.reuse_sums.tolist()
            snap["selection_reuse_sums"] = [kept, rows]
            snap["decode_selection_reuse_fraction"] = kept / rows if rows else None
        return snap

    def maybe_report(self, cfg: SparseConfig) -> None:
        """Write the metrics file every ``metrics.WRITE_EVERY_S`` and log every
        ``LOG_EVERY_S`` seconds (each reads the device sums: one small host sync)."""
        if self.starting_up:
            return
        now = time.monotonic()
        write = self.write_metrics and now - self._last_write >= metrics.WRITE_EVERY_S
        log = now - self._last >= LOG_EVERY_S
        if not (write or log):
            return
        snap = self.snapshot()
        if write:
            self._last_write = now
            try:
                metrics.write_snapshot(snap)
            except OSError as e:  # metrics are best effort; serving goes on
                self.write_metrics = False
                logger.warning("sparse-serve: cannot write the metrics file (%s); metrics "
                               "stay in the logs only", e)
        if not log:
            return
        self._last = now
        logger.info(
            "sparse-serve stats: prefill chunks sparse=%d dense=%d (at most min_seq_len=%d "
            "tokens, or prefill method dense), of the sparse ones fell back to dense=%d "
            "(first sparse layer: estimated density > prefill_dense_above=%s); decode steps=%d; "
            "decode KV read fraction=%s; prefill block density=%s (all layers)",
            snap["prefill_chunks_sparse"], snap["prefill_chunks_dense"], cfg.min_seq_len,
            snap["prefill_chunks_dense_fallback"], cfg.prefill_dense_above, snap["decode_steps"],
            _fmt(snap["decode_kv_fraction_read"]), _fmt(snap["prefill_block_density"]))
        if "decode_selection_reuse_fraction" in snap:
            logger.info("sparse-serve stats: decode rows that kept a stored page selection "
                        "(selection_reuse=%d) fraction=%s", cfg.selection_reuse,
                        _fmt(snap["decode_selection_reuse_fraction"]))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


PATH_COUNTERS = _PathCounters()


def reset_counts_after_warm_up() -> bool:
    """Reset :data:`PATH_COUNTERS` when the vLLM worker's ``compile_or_warm_up_model``
    returns.

    Start-up runs dummy batches through the metadata builder: the CUDA-graph captures (each
    resets the counts itself) and, after them, a sampler warm-up of ``max_num_seqs`` one-token
    requests (vLLM 0.26: 1,024 "dense prefill chunks" in the first stats line of a server).
    This wraps the method of the worker class already imported in this process, once, so
    that logs and ``/metrics`` count served requests only (``Worker.compile_or_warm_up_model``
    in ``vllm/v1/worker/gpu_worker.py`` exists in vLLM 0.26 and 0.33); until it returns,
    nothing is logged or written as metrics (a stats line during start-up showed the warm-up
    batch: "dense=1024" on the GPU, 2026-11-23). Returns whether the
    wrapper is in place; without that worker class (another vLLM layout, unit tests) the
    per-capture reset is all there is."""
    cls = getattr(sys.modules.get("vllm.v1.worker.gpu_worker"), "Worker", None)
    fn = getattr(cls, "compile_or_warm_up_model", None)
    if fn is None:
        return False
    if getattr(fn, "_sparse_serve_resets_counts", False):
        return True

    @functools.wraps(fn)
    def compile_or_warm_up_model(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        PATH_COUNTERS.starting_up = False
        try:
            PATH_COUNTERS.reset()
        except Exception as e:  # noqa: BLE001 - the counts are best effort; serving goes on
            logger.warning("sparse-serve: could not reset the path counts after vLLM's warm-up "
                           "(%s: %s); the start-up batches stay counted", type(e).__name__, e)
        return result

    compile_or_warm_up_model._sparse_serve_resets_counts = True
    cls.compile_or_warm_up_model = compile_or_warm_up_model
    PATH_COUNTERS.starting_up = True
    return True


_ADVICE = ("They live outside vLLM's KV-cache budget: lower --gpu-memory-utilization (page "
           "summaries take about 1/block_size of the KV cache), size the cache with "
           "--kv-cache-memory-bytes leaving that much free, or set SPARSE_SELECTION_REUSE=1 (no "
           "stored selections). See the README, 'Memory: page summaries and selections'.")
# What the side buffers must leave free for the rest of vLLM's start-up at least (the warm-up's
# activations, CUDA-graph capture, the sampler's warm-up): vLLM plans that memory inside
# --gpu-memory-utilization, but the buffers come out of the same free memory, so start-up stops
# here, with what to change, rather than at a bare CUDA out-of-memory error in a later
# allocation. Measured on an H100, 8B shape at 128K with CUDA graphs: leaving 0.7, 1.5 and 2.4
# GiB failed later in vLLM's warm-up (allocations of 448-896 MiB); vLLM's default 0.9 leaves
# about 3.2 GiB and starts. Shape-dependent: a larger model may need more.
START_UP_MARGIN_BYTES = 3 << 30


def _allocate_outside_kv_budget(what: str, nbytes: int, alloc):
    """``alloc()``, or a clear error where the GPU has no room for it. The page summaries
    and the stored selections are allocated on the first forward (vLLM's start-up warm-up),
    after vLLM has given the KV cache its share of ``--gpu-memory-utilization``, so they come
    out of the headroom that setting leaves; out of memory there stops start-up with what to
    change instead of a bare CUDA error."""
    try:
        return alloc()
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(
            f"sparse-serve: out of GPU memory allocating {what} ({nbytes / 2**20:.1f} MiB for "
            f"this layer, one such buffer per top-k layer). {_ADVICE} ({e})") from e


def _free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on ``device``: free on the GPU plus what PyTorch holds
    unused; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _check_room(what: str, per_layer: list[int], device: torch.device, *,
                memory_setting: tuple[float, int | None] | None = None,
                kv_bytes: int = 0) -> None:
    """Raise the out-of-memory error, before allocating anything, when the side buffers of
    every sparse layer (``per_layer`` bytes) would not leave free what the rest of vLLM's
    start-up needs (:func:`_start_up_reserve`). With the engine's ``memory_setting`` the
    message names a setting that makes room; ``kv_bytes``: the KV cache the buffers scale
    with (page summaries), 0 if they do not."""
    need = sum(per_layer)
    free = _free_device_bytes(device)
    if free is None:
        return
    total = _device_total_bytes(device)
    reserve = _start_up_reserve(memory_setting, total, _allocated_bytes(device))
    if need + reserve <= free:
        return
    suggestion = ""
    if memory_setting is not None:
        suggestion = _room_suggestion(need + reserve - free,
                                      need / kv_bytes if kv_bytes else 0.0, memory_setting,
                                      total)
    raise torch.OutOfMemoryError(
        f"sparse-serve: out of GPU memory for {what}: {len(per_layer)} layers need "
        f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free and "
        f"{reserve / 2**30:.2f} GiB must stay free for the rest of vLLM's start-up."
        f"{suggestion} {_ADVICE}")


def _start_up_reserve(memory_setting: tuple[float, int | None] | None, total: int,
                      allocated: int) -> int:
    """Bytes the rest of vLLM's start-up needs free: what ``--gpu-memory-utilization`` planned
    beyond what is allocated now (weights, KV cache), at least ``START_UP_MARGIN_BYTES``; the
    margin alone where the KV cache was sized in bytes (vLLM then plans nothing)."""
    if memory_setting is None or memory_setting[1]:
        return START_UP_MARGIN_BYTES
    return max(START_UP_MARGIN_BYTES, int(memory_setting[0] * total) - allocated)


def _allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


def _device_total_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def _room_suggestion(shortfall: int, per_kv_byte: float,
                     memory_setting: tuple[float, int | None], total: int) -> str:
    """`` Run with ...`` : the setting that frees ``shortfall`` bytes, the KV cache smaller by
    ``shortfall / (1 + per_kv_byte)`` (buffers of ``per_kv_byte`` per KV byte shrink with
    it)."""
    util, kv_cache_bytes = memory_setting
    cut = math.ceil(shortfall / (1.0 + per_kv_byte))
    if kv_cache_bytes:
        return (f" Run with --kv-cache-memory-bytes {max(0, kv_cache_bytes - cut)} or less "
                f"(now {kv_cache_bytes}).")
    lower = math.floor((util - cut / total) * 100) / 100  # 2 decimals, rounded down
    return (f" Run with --gpu-memory-utilization {lower:.2f} or less (now {util:g}).")


def _sparse_layers_in_context() -> list:
    """vLLM's attention layers served by this backend (layer objects with ``kv_cache`` and
    ``impl``), from the forward context; [] outside one (unit tests)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return []
        layers = get_forward_context().no_compile_layers
    except Exception:  # noqa: BLE001 - an engine without it: one layer at a time
        return []
    return [lay for lay in layers.values()
            if isinstance(getattr(lay, "impl", None), SparseAttentionImpl)
            and isinstance(getattr(lay, "kv_cache", None), torch.Tensor)
            and lay.kv_cache.dim() == 4]


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # no model-parallel group (unit tests build the classes directly)
        return 0


class SparseAttentionMetadataBuilder(AttentionMetadataBuilder[SparseAttentionMetadata]):
    # Pure-decode batches run in full CUDA graphs; mixed batches run attention eagerly
    # (vLLM's piecewise graphs), where the prefill path may size grids from host ints.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from sparse_kernels.pipeline import (
            all_decode_rows_full,
            decode_full_pages,
            decode_side_stream,
        )
        from vllm_sparse.full_rows_fa import make_full_rows_schedule

        cfg = vllm_sparse_config(vllm_config)
        PATH_COUNTERS.write_metrics = _tp_rank() == 0
        # Builders are made when the KV cache is set up, before the worker's warm-up.
        reset_counts_after_warm_up()
        mc = vllm_config.model_config
        pc = vllm_config.parallel_config
        block_size = kv_cache_spec.block_size
        num_heads_kv, head_size = mc.get_num_kv_heads(pc), mc.get_head_size()
        cfg.check_model(head_size=head_size, page_size=block_size, num_kv_heads=num_heads_kv)
        # Decode buffers cover every batch vLLM may run or capture as a CUDA graph.
        max_seqs = max(vllm_config.scheduler_config.max_num_seqs,
                       vllm_config.compilation_config.max_cudagraph_capture_size or 0)
        # An engine whose longest sequence reads every page at decode (max_model_len at most
        # the decode_min_seq_len threshold or the budget) never selects: its decode is dense.
        all_full = all_decode_rows_full(cfg, block_size, mc.max_model_len)
        dev = torch.device(device)
        self._init_decode_state(
            cfg, block_size=block_size, num_heads_q=mc.get_num_attention_heads(pc),
            num_heads_kv=num_heads_kv, head_size=head_size, max_seqs=max_seqs,
            # vLLM pads its block table's width; keep headroom and re-check in build().
            max_pages=(-(-mc.max_model_len // block_size) + 127) // 64 * 64,
            decode_all_full=all_full, device=dev,
            # made here, before CUDA-graph capture, and shared by every layer
            side_stream=(decode_side_stream(dev)
                         if cfg.decode_overlap and not all_full else None))
        if self.decode_all_full and "topk" in {cfg.decode_method} | {
                o.decode_method for o in cfg.head_overrides}:
            logger.info(
                "sparse-serve: max_model_len %d is at most the %d tokens below which top-k "
                "decode reads every page: decode runs dense in this engine (no page selection); "
                "raise max_model_len for top-k decode", mc.max_model_len,
                decode_full_pages(cfg, block_size) * block_size)
        if self.reuse_state is not None:
            logger.info("sparse-serve: decode page selections are reused for up to %d steps "
                        "(selection_reuse) after a request's first %d generated tokens "
                        "(selection_reuse_after); per top-k layer %.1f MiB of stored "
                        "selections", cfg.selection_reuse, cfg.selection_reuse_after,
                        self.selected.numel() * self.selected.element_size() / 2**20)
        self.full_rows_schedule = make_full_rows_schedule(
            cfg, vllm_config, page_size=block_size, num_heads_q=self.num_heads_q,
            num_heads_kv=num_heads_kv, head_size=self.head_size, max_seqs=max_seqs,
            device=dev, all_full=all_full)
        if self.full_rows_schedule is not None:
            logger.info("sparse-serve: decode rows that read every page go to vLLM's "
                        "FlashAttention (decode_dense_rows=%s), %s", cfg.decode_dense_rows,
                        "with an ahead-of-time FA3 schedule per step"
                        if self.full_rows_schedule.get_scheduler_metadata is not None
                        else "with FlashAttention's own split heuristic (no FA3 scheduler)")

    @classmethod
    def without_engine(cls, cfg: SparseConfig, *, block_size: int, num_heads_q: int,
                       num_heads_kv: int, head_size: int, max_seqs: int, max_pages: int,
                       device: torch.device, decode_all_full: bool = False,
                       side_stream: torch.cuda.Stream | None = None,
                       full_rows_schedule=None) -> SparseAttentionMetadataBuilder:
        """A builder made without a VllmConfig (CPU tests, benchmarks): the decode state
        ``build()`` reads, made by the same code as in ``__init__``; what vLLM's config
        decides there is given here (``decode_all_full``, the side stream, the FA schedule)."""
        b = object.__new__(cls)
        b._init_decode_state(cfg, block_size=block_size, num_heads_q=num_heads_q,
                             num_heads_kv=num_heads_kv, head_size=head_size,
                             max_seqs=max_seqs, max_pages=max_pages,
                             decode_all_full=decode_all_full, device=torch.device(device),
                             side_stream=side_stream)
        b.full_rows_schedule = full_rows_schedule
        return b

    def _init_decode_state(self, cfg: SparseConfig, *, block_size: int, num_heads_q: int,
                           num_heads_kv: int, head_size: int, max_seqs: int, max_pages: int,
                           decode_all_full: bool, device: torch.device,
                           side_stream: torch.cuda.Stream | None) -> None:
        """The buffers and settings ``build()`` reads, for decode batches of up to
        ``max_seqs`` rows and block tables of up to ``max_pages`` pages."""
        from sparse_kernels.pipeline import decode_budget_pages

        self.cfg, self.block_size = cfg, block_size
        self.num_heads_q, self.num_heads_kv, self.head_size = num_heads_q, num_heads_kv, head_size
        k, _, _ = decode_budget_pages(cfg, block_size)
        self.selected = torch.full((max_seqs, num_heads_kv, k), -1, dtype=torch.int32,
                                   device=device)
        self.workspace = self._decode_workspace(max_seqs, device)
        self.select_workspace = self._select_workspace(max_pages)
        self.decode_all_full = decode_all_full
        self.reuse_state = self.reuse_keep = None
        if cfg.selection_reuse > 1 and not decode_all_full:
            # Tags of the request each row last selected for, and this step's keep flags
            # (sparse_kernels.selection_reuse); each top-k layer keeps its own selections.
            from sparse_kernels.selection_reuse import new_reuse_state

            self.reuse_state, self.reuse_keep = new_reuse_state(max_seqs, device)
        self.side_stream = side_stream
        self.full_rows_schedule = None

    def _decode_workspace(self, max_seqs: int, device: torch.device):
        """Split-KV scratch for decode batches of up to ``max_seqs`` sequences, and the
        balanced kernel's segments where it may run (``decode_dense_kernel`` "balanced" or
        "auto")."""
        from sparse_kernels.balanced_decode import workspace_segments
        from sparse_kernels.sparse_decode import DecodeWorkspace

        segments = 0
        if self.cfg.decode_dense_kernel != "split":
            segments = workspace_segments(max_seqs, self.num_heads_kv, device)
        return DecodeWorkspace(max_seqs, self.num_heads_q, self.head_size, device=device,
                               segments=segments)

    def _select_workspace(self, max_pages: int):
        """Selection scratch for every batch of the decode buffers, rows ``max_pages`` wide;
        arrival counters only for the one-launch (``decode_select="fused"``) selection."""
        from sparse_kernels.page_select import SelectWorkspace

        return SelectWorkspace(self.selected.shape[0], self.num_heads_kv, max_pages,
                               device=self.selected.device,
                               counters=self.cfg.decode_select == "fused")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseAttentionMetadata:
        m = common_attn_metadata
        width = m.block_table_tensor.shape[1]
        if width > self.select_workspace.max_pages:
            self.select_workspace = self._select_workspace(width)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            m, decode_threshold=1)
        runs: list[PrefillRun] = []
        folded = 0
        if num_prefills:
            # A batch with prefill rows runs attention eagerly (never in a full CUDA graph), so
            # host lengths may shape it. Decode rows that read every page anyway join the dense
            # FlashAttention launch of the prefill rows: no selection launches, no launch of
            # ours for them (each costs host time in every layer of an eager step).
            seq_cpu = self._seq_lens_cpu(m)
            if num_decodes and self._decodes_read_every_page(seq_cpu[:num_decodes]):
                folded = num_decodes
            runs = self._prefill_runs(m, num_decodes - folded, seq_cpu, dense_below=folded)
        from sparse_kernels.pipeline import use_engine_dense_rows

        full_rows = None
        if num_decodes:
            PATH_COUNTERS.decode_steps += 1
            schedule = self.full_rows_schedule
            if not folded and schedule is not None and use_engine_dense_rows(
                    self.cfg, num_decodes, self.num_heads_kv, m.seq_lens.device,
                    all_full=self.decode_all_full):
                full_rows = schedule.prepare(m.seq_lens, m.query_start_loc, num_decodes,
                                             m.max_seq_len)
        if self.reuse_state is not None:
            # Every step, whatever the batch: rows that select in it get new tags, the rest
            # (prefill rows, folded rows, padding, rows past the batch) lose theirs.
            from sparse_kernels.selection_reuse import update_reuse_rows

            update_reuse_rows(self.reuse_state, self.reuse_keep, m.seq_lens,
                              m.block_table_tensor, num_decodes - folded, self.block_size,
                              self.cfg.selection_reuse,
                              counts=PATH_COUNTERS.reuse_sums_for(m.seq_lens.device),
                              reuse_after=self.cfg.selection_reuse_after)
        PATH_COUNTERS.maybe_report(self.cfg)
        return SparseAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            block_table=m.block_table_tensor, slot_mapping=m.slot_mapping,
            num_decodes=num_decodes - folded,
            num_decode_tokens=0 if folded else num_decode_tokens, prefill_runs=runs,
            selected=self.selected, workspace=self.workspace,
            select_workspace=self.select_workspace, side_stream=self.side_stream,
            full_rows=full_rows, decode_all_full=self.decode_all_full, folded_decodes=folded,
            reuse_keep=self.reuse_keep)

    def _decodes_read_every_page(self, decode_seq_lens: list[int]) -> bool:
        """Whether top-k decode would read every page of each of these rows (host lengths,
        upper bounds): at most :func:`~sparse_kernels.pipeline.decode_full_pages` pages."""
        from sparse_kernels.pipeline import decode_full_pages

        if self.decode_all_full:
            return True
        limit = decode_full_pages(self.cfg, self.block_size) * self.block_size
        return max(decode_seq_lens) <= limit

    @staticmethod
    def _seq_lens_cpu(m: CommonAttentionMetadata) -> list[int]:
        # vLLM's CPU copy is exact for prefill rows and an upper bound for decode rows; older
        # or hand-built metadata without it costs one device-to-host copy.
        upper = getattr(m, "seq_lens_cpu_upper_bound", None)
        return (upper if upper is not None else m.seq_lens.cpu()).tolist()

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata
                                    ) -> SparseAttentionMetadata:
        PATH_COUNTERS.reset()  # start-up batches are not served requests
        return self.build(0, common_attn_metadata)

    def _prefill_runs(self, m: CommonAttentionMetadata, first: int, seq_cpu: list[int],
                      dense_below: int = 0) -> list[PrefillRun]:
        """Runs of the requests from ``first`` on; those below ``dense_below`` (decode rows
        folded into the dense launch) are dense."""
        from sparse_kernels.block_sparse_prefill import prefill_block_metadata

        qsl_cpu = m.query_start_loc_cpu.tolist()
        sparse_method = self.cfg.prefill_method != "dense" or any(
            o.prefill_method not in (None, "dense") for o in self.cfg.head_overrides)
        kinds = [sparse_method and r >= dense_below and seq_cpu[r] > self.cfg.min_seq_len
                 for r in range(first, m.num_reqs)]
        runs: list[PrefillRun] = []
        r = first
        while r < m.num_reqs:
            kind = kinds[r - first]
            e = r
            while e < m.num_reqs and kinds[e - first] == kind:
                e += 1
            t0, t1 = qsl_cpu[r], qsl_cpu[e]
            qsl = m.query_start_loc[r:e + 1] - t0
            seq_lens = m.seq_lens[r:e]
            run = PrefillRun(
                sparse=kind, tok_start=t0, tok_end=t1, req_start=r, req_end=e,
                query_start_loc=qsl, seq_lens=seq_lens, block_table=m.block_table_tensor[r:e],
                max_query_len=max(qsl_cpu[i + 1] - qsl_cpu[i] for i in range(r, e)),
                max_seq_len=max(seq_cpu[r:e]))
            if kind:
                run.block_meta = prefill_block_metadata(
                    qsl, seq_lens, self.cfg.block_size, num_tokens=t1 - t0,
                    max_seq_len=run.max_seq_len)
                run.causal_blocks = _causal_blocks(run.block_meta)
                PATH_COUNTERS.sparse_prefill_reqs += e - r
            else:
                PATH_COUNTERS.dense_prefill_reqs += e - max(r, dense_below)
            runs.append(run)
            r = e
        return runs


# --------------------------------------------------------------------------- backend


class SparseAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    # The kernels read bf16/fp16 K/V; quantized caches are refused at start-up.
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM 0.26 maps get_name() back to an AttentionBackendEnum member; ours is CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseAttentionImpl]:
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseAttentionMetadataBuilder]:
        return SparseAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % 16 == 0

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # vLLM 0.26 asks the backend; 0.33 derives the shape itself and never calls this.
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # NHD in memory: [num_blocks, block_size, num_kv_heads, 2 * head_size], as FLASH_ATTN.
        if include_num_layers_dimension:
            return (1, 0, 3, 2, 4)
        return (0, 2, 1, 3)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in (64, 128)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8


# --------------------------------------------------------------------------- impl

_LAYER_RE = re.compile(r"\.(\d+)\.")


class SparseAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append(f"sliding window ({sliding_window})")
        if logits_soft_cap:
            unsupported.append(f"logits soft-cap ({logits_soft_cap})")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type}")
        if sinks is not None:
            unsupported.append("learned attention sinks")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            unsupported.append(f"KV cache dtype {kv_cache_dtype}")
        if head_size not in (64, 128):
            unsupported.append(f"head size {head_size}")
        if kwargs:
            unsupported.extend(sorted(f"{k}={v}" for k, v in kwargs.items() if v not in (None, False, -1)))
        if unsupported:
            raise SparseConfigError(
                "the sparse-serve backend cannot serve this model: " + ", ".join(unsupported)
                + " not supported; use the default attention backend for it")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.cfg = vllm_sparse_config()
        if any(o.heads is not None and o.decode_method is not None
               for o in self.cfg.head_overrides):
            raise SparseConfigError(
                "per-KV-head decode_method overrides in head_config are not supported yet (a "
                "decode step selects one page budget per KV head); give decode_method per layer "
                "(\"heads\": \"all\") and per-head entries prefill_method only")
        self._summaries: torch.Tensor | None = None
        # this layer's own page selections, kept between steps (selection reuse only)
        self._selected: torch.Tensor | None = None
        self._methods: tuple[str | dict[int | None, str], str] | None = None
        self._layer_index: int | None = None
        # this layer measures decode reads / counts prefill fallbacks (see _PathCounters)
        self._decode_stats = self._prefill_fallback_stats = False
        # (gpu_memory_utilization, kv_cache_memory_bytes): for the setting an out-of-memory
        # error at start-up suggests (read here: forward runs without a current config)
        self._memory_setting: tuple[float, int | None] | None = None
        try:
            from vllm.config import get_current_vllm_config

            vc = get_current_vllm_config()
            self.max_model_len = vc.model_config.max_model_len
            self._memory_setting = (float(vc.cache_config.gpu_memory_utilization),
                                    vc.cache_config.kv_cache_memory_bytes)
        except Exception:  # no current config (unit tests)
            self.max_model_len = None

    # -- helpers ---------------------------------------------------------------------------
    def _layer_methods(self, layer) -> tuple[str | dict[int | None, str], str]:
        """(prefill method, or a per-KV-head map; decode method) of this layer."""
        if self._methods is None:
            name = getattr(layer, "layer_name", "") or ""
            m = _LAYER_RE.search(name + ".")
            idx = int(m.group(1)) if m else None
            self._layer_index = idx
            prefill, decode = self.cfg.methods_for(idx if idx is not None else -1)
            if len(prefill) > 1:
                # head_config names the model's KV heads; this rank holds a slice of them.
                first = self._first_global_kv_head()
                local = {h - first: m for h, m in prefill.items()
                         if h is not None and 0 <= h - first < self.num_kv_heads}
                prefill = {None: prefill[None], **local}
            self._methods = (prefill if len(prefill) > 1 else prefill[None], decode[None])
            at = idx if idx is not None else 0
            self._decode_stats = at == self.cfg.first_layer_with("decode")
            self._prefill_fallback_stats = at == self.cfg.first_layer_with("prefill")
            PATH_COUNTERS.decode_layers[idx] = decode[None]
        return self._methods

    def _first_global_kv_head(self) -> int:
        """The model's index of this rank's KV head 0 under tensor parallelism.

        Query heads are split evenly over ranks; rank ``r`` holds query heads from
        ``r * num_heads``, whose KV head is that index divided by the model's GQA group. Also
        right when KV heads are replicated (fewer KV heads than ranks)."""
        try:
            from vllm.config import get_current_vllm_config

            vc = get_current_vllm_config()
            pc = vc.parallel_config
            total_q = vc.model_config.get_num_attention_heads(pc) * pc.tensor_parallel_size
            total_kv = vc.model_config.get_total_num_kv_heads()
        except Exception:  # no current config (unit tests): a single rank
            return 0
        group = max(1, total_q // max(1, total_kv))
        return _tp_rank() * self.num_heads // group

    def _kv_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, N, 2*D) -> the K and V views (B, N, H, D), as vLLM's FlashAttention reads
        them."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        return key_cache, value_cache

    def _decodes_top_k(self, layer) -> bool:
        """Whether this layer's decode method (by config) is top-k: it keeps page summaries
        and, with selection reuse, stored selections."""
        return self._layer_methods(layer)[1] == "topk"

    def _get_summaries(self, key_cache: torch.Tensor) -> torch.Tensor:
        s = self._summaries
        if s is None or s.shape[0] != key_cache.shape[0] or s.device != key_cache.device:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparse-serve: page summaries must be allocated before "
                                   "CUDA graph capture")
            from sparse_kernels.page_summary import page_summaries_shape

            # The first layer to need them allocates every top-k layer's at once, after
            # checking that they fit (one clear error, before any allocation of this kind).
            todo = [(self, key_cache)] + [
                (lay.impl, self._kv_views(lay.kv_cache)[0]) for lay in _sparse_layers_in_context()
                if lay.impl is not self and lay.impl._summaries is None
                and lay.impl._decodes_top_k(lay)]
            sizes = [math.prod(page_summaries_shape(kc)) * kc.element_size() for _, kc in todo]
            kv = sum(2 * kc.numel() * kc.element_size() for _, kc in todo)  # K and V
            _check_room("page summaries", sizes, key_cache.device,
                        memory_setting=self._memory_setting, kv_bytes=kv)
            for (impl, kc), nbytes in zip(todo, sizes):
                impl._allocate_summaries(kc, nbytes)
            s = self._summaries
            if self._layer_index in (0, None):  # once, not once per layer
                logger.info("sparse-serve: page summaries %s, %.1f MiB per attention layer, "
                            "%d layers allocated at once", tuple(s.shape),
                            s.numel() * s.element_size() / 2**20, len(todo))
        return s

    def _allocate_summaries(self, key_cache: torch.Tensor, nbytes: int) -> None:
        from sparse_kernels.page_summary import allocate_page_summaries

        # Zeros: a page's summary is recomputed from its tokens whenever a step writes into
        # it, and a request only ever reads pages it (or the prefix cache) wrote.
        self._summaries = _allocate_outside_kv_budget(
            "page summaries", nbytes, lambda: allocate_page_summaries(key_cache).zero_())

    def _get_selected(self, shared: torch.Tensor) -> torch.Tensor:
        """This layer's selection buffer for selection reuse (the builder's ``selected`` is
        shared by every layer and rewritten by each: a kept selection must be the layer's
        own). Allocated on the first forward, before CUDA-graph capture, for every top-k
        layer at once."""
        s = self._selected
        if s is None or s.shape != shared.shape or s.device != shared.device:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparse-serve: selection buffers must be allocated before "
                                   "CUDA graph capture")
            todo = [self] + [lay.impl for lay in _sparse_layers_in_context()
                             if lay.impl is not self and lay.impl._selected is None
                             and lay.impl._decodes_top_k(lay)]
            nbytes = shared.numel() * shared.element_size()
            _check_room("stored page selections (selection reuse)", [nbytes] * len(todo),
                        shared.device, memory_setting=self._memory_setting)
            for impl in todo:
                impl._selected = _allocate_outside_kv_budget(
                    "stored page selections (selection reuse)", nbytes,
                    lambda: torch.full_like(shared, -1))
            s = self._selected
        return s

    # -- KV write (vLLM calls this before forward: forward_includes_kv_cache_update=False) ---
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # slot_mapping's length bounds the write
        key_cache, value_cache = self._kv_views(kv_cache)
        if self._write_keeps_summaries(layer, key_cache.shape[1]):
            # The write and, for pages one token of the step writes (decode tokens), their
            # summaries, in one launch: a decode step has no summary work anywhere else.
            from sparse_kernels.kv_write import write_kv_and_summaries

            write_kv_and_summaries(key, value, key_cache, value_cache, slot_mapping,
                                   self._get_summaries(key_cache))
            return
        from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash

        reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                self.kv_cache_dtype, layer._k_scale, layer._v_scale)

    def _write_keeps_summaries(self, layer, page_size: int) -> bool:
        """Whether this layer's KV write refreshes the page summaries of decode tokens: a
        top-k decode layer of an engine that selects pages, writing its own cache (vLLM
        calls no KV write for a layer that shares another's). Static per layer, so a CUDA
        graph keeps the choice; forward refreshes them in the scoring launch otherwise."""
        from sparse_kernels.pipeline import all_decode_rows_full

        return (self.kv_sharing_target_layer_name is None
                and self._decodes_top_k(layer)
                and not all_decode_rows_full(self.cfg, page_size, self.max_model_len))

    # -- forward ---------------------------------------------------------------------------
    def forward(self, layer, query, key, value, kv_cache, attn_metadata: SparseAttentionMetadata,
                output=None, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparse-serve: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        from sparse_kernels.decode_stats import accumulate_decode_reads
        from sparse_kernels.page_summary import update_page_summaries
        from sparse_kernels.pipeline import decode_attention, sparse_prefill_attention

        m = attn_metadata
        prefill_method, decode_method = self._layer_methods(layer)
        if m.decode_all_full:  # (top-k would read every page of every row: no selection)
            decode_method = "dense"
        key_cache, value_cache = self._kv_views(kv_cache)
        # Only top-k decode reads summaries: a layer decoding dense (by config, or in a short
        # engine) allocates none.
        summaries = self._get_summaries(key_cache) if decode_method == "topk" else None
        n = m.num_actual_tokens
        if m.prefill_runs and decode_method == "topk":
            # The pages prefill chunks wrote (and decode tokens' pages again: harmless). A
            # decode token's page was summarized by the KV write (do_kv_cache_update), so a
            # pure-decode step (CUDA graph) has no summary launch. Only top-k decode reads
            # summaries: a layer decoding dense does not maintain them.
            update_page_summaries(key_cache, summaries, m.block_table, m.query_start_loc,
                                  m.seq_lens, num_tokens=query.shape[0])
        q = query[:n]
        out = output[:n]
        if self.max_model_len:
            _warm_up_once(prefill_method, decode_method, self.cfg, q, key_cache, value_cache,
                          summaries, self.max_model_len, self.scale)
        nd = m.num_decodes
        stats = PATH_COUNTERS.sums_for(q.device)
        if m.folded_decodes and self._decode_stats:  # read whole, by the dense launch below
            accumulate_decode_reads(None, m.seq_lens[:m.folded_decodes], key_cache.shape[1],
                                    self.num_kv_heads, stats)
        if nd:
            keep = m.reuse_keep if decode_method == "topk" else None
            full_rows, fr = None, m.full_rows
            if fr is not None and (decode_method == "topk" or m.decode_all_full):
                # the builder chose vLLM's FlashAttention for the full rows (here every row,
                # where every row is full; a dense layer of a longer engine keeps ours)
                full_rows = functools.partial(
                    _dense_decode_rows, q[:nd], key_cache, value_cache,
                    m.query_start_loc[:nd + 1], m.block_table[:nd], self.scale,
                    self.max_model_len, scheduler_metadata=fr.scheduler_metadata,
                    num_splits=fr.num_splits, q_lens=fr.q_lens)
            sel = decode_attention(decode_method, self.cfg, q[:nd], key_cache, value_cache,
                                   summaries, m.block_table[:nd], m.seq_lens[:nd], out[:nd],
                                   self.scale,
                                   selected=m.selected if keep is None
                                   else self._get_selected(m.selected),
                                   workspace=m.workspace,
                                   select_workspace=m.select_workspace,
                                   fuse_summary=not self._write_keeps_summaries(
                                       layer, key_cache.shape[1]),
                                   side_stream=m.side_stream, full_rows_attention=full_rows,
                                   full_rows_seq_lens=None if full_rows is None
                                   else fr.seq_lens,
                                   full_rows_disjoint=full_rows is not None
                                   and fr.q_lens is not None, keep=keep)
            if self._decode_stats:  # one launch (a dense row counts its whole sequence)
                accumulate_decode_reads(sel, m.seq_lens[:nd], key_cache.shape[1],
                                        self.num_kv_heads, stats)
        for run in m.prefill_runs:
            qr, orun = q[run.tok_start:run.tok_end], out[run.tok_start:run.tok_end]
            computed = None  # fraction of causal blocks computed; None: all (dense)
            if run.sparse and prefill_method != "dense":
                dens, fell_back = sparse_prefill_attention(
                    prefill_method, self.cfg, qr, key_cache, value_cache, run.block_table,
                    run.block_meta, orun, self.scale,
                    dense_fallback=lambda qr=qr, run=run, orun=orun: _dense_prefill(
                        qr, key_cache, value_cache, run, orun, self.scale))
                if fell_back and self._prefill_fallback_stats:
                    PATH_COUNTERS.prefill_dense_fallbacks += run.req_end - run.req_start
                computed = None if fell_back else dens
            else:
                _dense_prefill(qr, key_cache, value_cache, run, orun, self.scale)
            if run.sparse:  # sparse-eligible chunks, whether this layer ran them sparse or not
                causal = run.causal_blocks * self.num_kv_heads
                stats[2] += causal if computed is None else computed.double() * causal
                stats[3] += causal
        return output


_WARMED: set = set()


def _warm_up_once(prefill_method, decode_method, cfg, q, key_cache, value_cache, summaries,
                  max_model_len, scale) -> None:
    """JIT-compile the prefill kernels for every length bucket, the decode kernel for every
    split-count bucket (eager mixed batches of sizes no CUDA graph was captured for) and the
    summary update of top-k decode layers, once per process and shape, on the first forward
    that is not being captured into a CUDA graph, so that no request pays a compilation.
    (Arguments that vary with batch and lengths are not specialized on by the kernels; what
    is left are compile-time constants of these buckets.)"""
    key = (repr(prefill_method), decode_method, q.shape[1:], q.dtype, key_cache.shape[1:],
           key_cache.dtype)
    if key in _WARMED or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    _WARMED.add(key)
    from sparse_kernels.pipeline import warm_up_decode, warm_up_prefill, warm_up_summary_update

    t0 = time.monotonic()
    if decode_method == "topk":
        warm_up_summary_update(key_cache, summaries)
    warm_up_decode(decode_method, cfg, q, key_cache, value_cache, scale)
    if prefill_method == "dense":
        return
    lengths = warm_up_prefill(prefill_method, cfg, q, key_cache, value_cache, max_model_len,
                              scale)
    logger.info("sparse-serve: prefill kernels (%s) compiled for sequence lengths %s, batches "
                "of 1 and 2, in %.1f s", prefill_method, lengths, time.monotonic() - t0)


def _causal_blocks(meta) -> torch.Tensor:
    """Device scalar: causal (query block, key block) pairs of a prefill run."""
    valid = meta.q_block_seq >= 0
    return torch.where(valid, meta.q_block_idx.double() + 1.0, 0.0).sum()


@functools.cache
def _fa_version() -> int:
    """The FlashAttention version vLLM's FLASH_ATTN backend would use here (3 on Hopper)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        return get_flash_attn_version() or 3
    except Exception:  # older or newer layouts of vLLM
        return 3


def _dense_prefill(q, key_cache, value_cache, run: PrefillRun, out, scale: float) -> None:
    """Dense causal prefill with vLLM's FlashAttention (what FLASH_ATTN runs)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    flash_attn_varlen_func(
        q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=run.query_start_loc,
        max_seqlen_q=run.max_query_len, seqused_k=run.seq_lens, max_seqlen_k=run.max_seq_len,
        softmax_scale=scale, causal=True, block_table=run.block_table, fa_version=_fa_version())


def _dense_decode_rows(q, key_cache, value_cache, query_start_loc, block_table, scale: float,
                       max_model_len: int | None, seq_lens, out, max_seq_len: int, *,
                       scheduler_metadata=None, num_splits: int = 0, q_lens=None) -> None:
    """Decode rows that read every page, with vLLM's FlashAttention (``full_rows_attention`` of
    :func:`sparse_kernels.pipeline.decode_attention`: rows of length 0 are the others'). No host
    value changes between steps (``max_seq_len`` is the config's bound), so it is captured in
    the decode CUDA graphs like the rest. ``scheduler_metadata`` / ``num_splits``: FA3's
    ahead-of-time schedule of this step (:mod:`vllm_sparse.full_rows_fa`), as vLLM's own
    FLASH_ATTN backend passes them. ``q_lens`` (FA3 with ``seqused_q``): 1 for those rows, 0
    for the others, which FA3 then leaves unwritten
    (:func:`vllm_sparse.full_rows_fa.fa3_decode_rows`)."""
    max_k = min(max_seq_len, max_model_len or max_seq_len)
    if q_lens is not None:
        from vllm_sparse.full_rows_fa import fa3_decode_rows, fa3_masked_ops

        fa3_decode_rows(fa3_masked_ops()[0], q, key_cache, value_cache, out, query_start_loc,
                        q_lens, seq_lens, max_k, block_table, scale,
                        scheduler_metadata=scheduler_metadata, num_splits=num_splits)
        return
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    flash_attn_varlen_func(
        q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=query_start_loc, max_seqlen_q=1,
        seqused_k=seq_lens, max_seqlen_k=max_k,
        softmax_scale=scale, causal=True, block_table=block_table,
        scheduler_metadata=scheduler_metadata, num_splits=num_splits, fa_version=_fa_version())

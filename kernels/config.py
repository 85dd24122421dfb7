"""Sparse-attention configuration: one frozen dataclass, parsed once.

Sources, lowest precedence first:
  1. the defaults below;
  2. environment variables ``SPARSE_<FIELD>`` (e.g. ``SPARSE_TOKEN_BUDGET=4096``);
  3. an engine-side dict (vLLM ``--additional-config '{"sparse": {...}}'``).

Every unknown key and every impossible value raises :class:`SparseConfigError`
with a message naming the key, before the engine starts serving. Checks that
need the model or the KV-cache layout (head size, page size) live in
:meth:`SparseConfig.check_model`, called by the adapters at backend start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "SPARSE_"

PREFILL_METHODS = ("dense", "streaming", "xattention", "vertical_slash", "flexprefill")
DECODE_METHODS = ("dense", "topk")
# How top-k decode runs its selection (launches per layer and step, besides the attention):
# "auto": a scoring launch, then the single-stage top-k, or the two-stage top-k (two launches)
# for small grids on long block tables (the measured default); "single": always the
# single-stage top-k (two launches); "fused": scoring and top-k in one launch (the last
# program of a row selects). Every choice selects the same pages.
DECODE_SELECTS = ("auto", "single", "fused")
# Who attends the decode rows that read every page: ours ("triton"), the engine's dense decode
# kernel ("engine", beside the selection with decode_overlap; adapters without one use ours),
# or "auto" (the default): the engine's only in an engine whose every decode row reads every
# page (max_model_len at most the dense decode threshold: decode is dense there, no selection
# runs, pipeline.all_decode_rows_full) and only on large decode grids (batch x KV heads above
# half the SMs); ours everywhere else. Measured on one H100, 4K prompts end to end
# (benchmarks/results/e2e_vllm_2026-11-23_h100_session11/, FLASH_ATTN on the same machine):
# in a 4K engine the batch-16 step took 9.55 ms with the engine's FA3 and 9.73 with ours
# (FLASH_ATTN 9.56), batch-1 TPOT 6.67 ms with ours (6.77); in a 128K engine ours took 9.88
# ms and FA3 10.12 (FLASH_ATTN 9.61): there FA3 (a persistent kernel) runs before the page
# selection's launches instead of beside them (decode_engine_2026-11-23_h100_session11/).
DECODE_DENSE_ROWS = ("triton", "engine", "auto")
# Our dense-mode decode kernel (method "dense"; the rows top-k reads whole, where ours attends
# them): "split", a fixed split count per (sequence, KV head) row (sparse_decode);
# "balanced", the batch's tiles cut evenly over a fixed number of programs (balanced_decode);
# "auto", balanced on grids of at least 3/4 of the SMs in (batch x KV heads) rows, split
# below. Measured on an H100 (decode_engine_2026-11-24_h100_session14/, us per layer, top-k
# step in a 132K engine): balanced 107.7 vs split 111.0 at 4K x batch 16, 3-5% faster at
# batch 32 (3K-8K), 5-10% slower at batch 8, 3x slower at batch 1 (43 vs 13 us: its merge
# walks up to 66 segments per row); end to end, 4K prompts x batch 16 in a 128K engine:
# 0.937x of FLASH_ATTN's step against 0.927x (two interleaved rounds each).
DECODE_DENSE_KERNELS = ("split", "balanced", "auto")

# Env vars with the prefix that are not config fields but are ours on purpose:
# SPARSE_ATTN switches the plugins' env-only mode (see vllm_sparse.env_switch), and
# SPARSE_SERVE_* is left to tooling (tests, benchmarks).
_RESERVED_ENV = frozenset({"SPARSE_ATTN"})
_RESERVED_PREFIX = "SPARSE_SERVE_"


class SparseConfigError(ValueError):
    """A sparse-serve configuration that cannot be served."""


@dataclass(frozen=True)
class HeadOverride:
    """Per-layer / per-head method override read from the head-config file."""

    layer: int | None  # None: all layers
    heads: tuple[int, ...] | None  # KV-head indices; None: all heads
    prefill_method: str | None = None
    decode_method: str | None = None


@dataclass(frozen=True)
class SparseConfig:
    # --- which method runs where -------------------------------------------------
    # Dense by default: every sparse prefill method measured so far loses retrieval accuracy
    # at the 30% block budget (XAttention 0.9: -18 points on 32K multi-key NIAH with the needle
    # at the start of the haystack; it needs ~66% of the blocks to stay within 5 points,
    # benchmarks/results/accuracy_2026-11-23_h100_session7/), while top-k decode at the default
    # budget costs nothing measurable. Sparse prefill is opt-in (SPARSE_PREFILL_METHOD).
    prefill_method: str = "dense"
    decode_method: str = "topk"
    # --- decode: top-k page selection ---------------------------------------------
    token_budget: int = 8192  # KV tokens read per (sequence, KV head) per step
    # first tokens always kept (decode pages and prefill blocks). 128 was measured and not
    # adopted: it did not win back the 32K multi-key needles planted at token ~64 (5 of 10 at
    # depth 0 against 4 of 10; dense 9), benchmarks/results/accuracy_2026-11-23_h200_session4/
    sink_tokens: int = 64
    local_tokens: int = 512  # last tokens always kept (decode, and streaming prefill unless:)
    # streaming prefill's local window in tokens; 0 means local_tokens. Separate so that the
    # A-shape window can be swept without changing what decode always keeps (nor its budget)
    streaming_local_tokens: int = 0
    # reuse a page selection for up to R decode steps (LServe); 1 selects afresh every step.
    # 4 since session 22: with the 32-token warm-up below, Qwen2.5-0.5B at 32K kept all 150
    # depth-0 short answers identical to R=1 and long answers within noise (-0.4 points;
    # benchmarks/results/accuracy_2026-11-24_h100_session21_reuse_after/)
    selection_reuse: int = 4
    # with selection_reuse > 1: a request's first this-many generated tokens always select
    # afresh (a short answer is all such tokens). Measured (Qwen2.5-0.5B, 32K, session 21):
    # R=4 from the first token flipped 4 of 270 short retrieval answers, mostly in their first
    # digits, and cost long answers nothing measurable (-0.2 points)
    selection_reuse_after: int = 32
    decode_select: str = "auto"  # selection launches: see DECODE_SELECTS
    # rows that read every page (within the budget, or dense rows) are attended beside the
    # selection, on another stream, instead of after it (pipeline.decode_attention)
    decode_overlap: bool = True
    # which kernel attends those rows (or every row, where all are full): see DECODE_DENSE_ROWS
    decode_dense_rows: str = "auto"
    # which of our kernels, where ours attends them: see DECODE_DENSE_KERNELS
    decode_dense_kernel: str = "auto"
    # --- when sparsity applies -------------------------------------------------------
    min_seq_len: int = 4096  # sequences of at most this many tokens take the dense path
    # decode reads every page (no scoring, no top-k) of sequences of at most this many
    # tokens (rounded down to whole pages); 0 means 2 * token_budget
    decode_min_seq_len: int = 0
    # a prefill chunk whose estimated block density exceeds this runs dense FA3 instead
    # (the estimator found little to skip); 1.0 never falls back
    prefill_dense_above: float = 0.6
    # the last this-many query blocks of each sequence in a prefill chunk attend to every earlier
    # block whatever the estimator chose (the newest tokens; in the last chunk, the question)
    prefill_dense_last_blocks: int = 0
    # --- prefill estimators ----------------------------------------------------------
    block_size: int = 64  # query/key block of the block-sparse prefill kernel
    xattn_threshold: float = 0.9  # XAttention cumulative-probability threshold
    xattn_stride: int = 8  # XAttention antidiagonal stride
    vs_vertical: int = 1024  # MInference vertical-slash: vertical lines kept
    vs_slash: int = 4096  # MInference vertical-slash: slash lines kept
    vs_last_q: int = 64  # queries at the chunk end used to estimate the pattern
    flex_gamma: float = 0.9  # FlexPrefill cumulative-attention threshold
    flex_tau: float = 0.1  # FlexPrefill JS-divergence threshold for query-aware heads
    # --- per-head overrides ----------------------------------------------------------
    head_config: str | None = None  # path to a JSON file of per-layer/per-head methods
    head_overrides: tuple[HeadOverride, ...] = field(default=(), compare=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sources(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> SparseConfig:
        """Build from env vars, then ``overrides`` (engine CLI), then validate."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        names = _field_names()
        unknown_env = []
        for key, raw in environ.items():
            if (not key.startswith(ENV_PREFIX) or key in _RESERVED_ENV
                    or key.startswith(_RESERVED_PREFIX)):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in names or name == "head_overrides":
                unknown_env.append(key)
                continue
            values[name] = _coerce(name, raw, source=key)
        if unknown_env:
            raise SparseConfigError(
                f"unknown sparse-serve environment variable(s) {sorted(unknown_env)}; "
                f"valid: {sorted(ENV_PREFIX + n.upper() for n in names - {'head_overrides'})}"
            )
        for key, raw in (overrides or {}).items():
            if key not in names or key == "head_overrides":
                raise SparseConfigError(
                    f"unknown sparse-serve config key {key!r}; "
                    f"valid: {sorted(names - {'head_overrides'})}"
                )
            values[key] = _coerce(key, raw, source=f"config key {key!r}")
        cfg = cls(**values)
        if cfg.head_config:
            cfg = dataclasses.replace(cfg, head_overrides=load_head_config(cfg.head_config))
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Checks that need nothing but the config itself."""
        _check_choice("prefill_method", self.prefill_method, PREFILL_METHODS)
        _check_choice("decode_method", self.decode_method, DECODE_METHODS)
        _check_choice("decode_select", self.decode_select, DECODE_SELECTS)
        _check_choice("decode_dense_rows", self.decode_dense_rows, DECODE_DENSE_ROWS)
        _check_choice("decode_dense_kernel", self.decode_dense_kernel, DECODE_DENSE_KERNELS)
        for name in ("token_budget", "block_size", "xattn_stride", "vs_last_q",
                     "selection_reuse"):
            if getattr(self, name) < 1:
                raise SparseConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sink_tokens", "local_tokens", "streaming_local_tokens", "min_seq_len",
                     "decode_min_seq_len", "selection_reuse_after",
                     "vs_vertical", "vs_slash", "prefill_dense_last_blocks"):
            if getattr(self, name) < 0:
                raise SparseConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sink_tokens + self.local_tokens > self.token_budget:
            raise SparseConfigError(
                f"impossible budget: sink_tokens ({self.sink_tokens}) + local_tokens "
                f"({self.local_tokens}) exceed token_budget ({self.token_budget})"
            )
        for name in ("xattn_threshold", "flex_gamma", "prefill_dense_above"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise SparseConfigError(f"{name} must be in (0, 1], got {v}")
        if self.flex_tau < 0.0:
            raise SparseConfigError(f"flex_tau must be >= 0, got {self.flex_tau}")
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise SparseConfigError(
                f"block_size must be a power of two >= 16, got {self.block_size}"
            )
        if self.xattn_stride > self.block_size or self.block_size % self.xattn_stride:
            raise SparseConfigError(
                f"xattn_stride ({self.xattn_stride}) must divide block_size ({self.block_size})"
            )
        for o in self.head_overrides:
            if o.prefill_method is not None:
                _check_choice("head_config prefill_method", o.prefill_method, PREFILL_METHODS)
            if o.decode_method is not None:
                _check_choice("head_config decode_method", o.decode_method, DECODE_METHODS)

    def check_model(self, *, head_size: int, page_size: int, num_kv_heads: int,
                    num_layers: int | None = None) -> None:
        """Checks that need the model and the engine's KV-cache layout."""
        if head_size not in (64, 128):
            raise SparseConfigError(
                f"sparse-serve kernels support head sizes 64 and 128; this model has {head_size}"
            )
        if self.decode_method == "topk":
            if page_size < 1:
                raise SparseConfigError(f"page size must be >= 1, got {page_size}")
            if self.token_budget % page_size:
                raise SparseConfigError(
                    f"token_budget ({self.token_budget}) must be a multiple of the KV page "
                    f"size ({page_size})"
                )
            sink_pages = -(-self.sink_tokens // page_size)
            local_pages = -(-self.local_tokens // page_size)
            if sink_pages + local_pages > self.token_budget // page_size:
                raise SparseConfigError(
                    f"impossible budget: {sink_pages} sink + {local_pages} local pages of "
                    f"{page_size} tokens exceed the {self.token_budget // page_size}-page budget"
                )
        for o in self.head_overrides:
            if o.heads and max(o.heads) >= num_kv_heads:
                raise SparseConfigError(
                    f"head_config names KV head {max(o.heads)} but the model has "
                    f"{num_kv_heads} KV heads per rank"
                )
            if num_layers is not None and o.layer is not None and o.layer >= num_layers:
                raise SparseConfigError(
                    f"head_config names layer {o.layer} but the model has {num_layers} layers"
                )

    # ------------------------------------------------------------------ queries
    @property
    def is_dense(self) -> bool:
        return (self.prefill_method == "dense" and self.decode_method == "dense"
                and not self.head_overrides)

    @property
    def prefill_local_tokens(self) -> int:
        """Streaming prefill's local window: ``streaming_local_tokens``, or ``local_tokens``
        when it is 0."""
        return self.streaming_local_tokens or self.local_tokens

    @property
    def effective_decode_min_seq_len(self) -> int:
        """Decode reads every page of sequences of at most this many tokens (rounded down to
        whole pages by the decode path): ``decode_min_seq_len``, or ``2 * token_budget`` when it
        is 0. Values up to ``token_budget`` turn the dense rows off (a sequence that fits the
        budget reads all its pages anyway)."""
        return self.decode_min_seq_len or 2 * self.token_budget

    def methods_for(self, layer: int) -> tuple[dict[int | None, str], dict[int | None, str]]:
        """(prefill, decode) methods for ``layer``: {kv_head or None(=default): method}."""
        prefill: dict[int | None, str] = {None: self.prefill_method}
        decode: dict[int | None, str] = {None: self.decode_method}
        for o in self.head_overrides:
            if o.layer is not None and o.layer != layer:
                continue
            for target, method in ((prefill, o.prefill_method), (decode, o.decode_method)):
                if method is None:
                    continue
                if o.heads is None:
                    target.clear()
                    target[None] = method
                else:
                    for h in o.heads:
                        target[h] = method
        return prefill, decode

    def first_layer_with(self, kind: str) -> int:
        """The lowest layer index whose ``kind`` ("prefill" or "decode") method is sparse for
        some KV head, or 0 when no layer's is (methods only change at layers that head_config
        names, so the candidates are 0 and those layers and their successors)."""
        pick = 0 if kind == "prefill" else 1
        cands = {0}
        for o in self.head_overrides:
            if o.layer is not None:
                cands |= {o.layer, o.layer + 1}
        for layer in sorted(cands):
            if any(m != "dense" for m in self.methods_for(layer)[pick].values()):
                return layer
        return 0

    def summary(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("head_overrides")
        d["head_overrides"] = len(self.head_overrides)
        return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------- helpers

def _field_names() -> set[str]:
    return {f.name for f in fields(SparseConfig)}


_FIELD_TYPES = {f.name: f.type for f in fields(SparseConfig)}


def _coerce(name: str, raw: Any, *, source: str) -> Any:
    typ = _FIELD_TYPES[name]
    try:
        if typ == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if typ == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            word = str(raw).strip().lower() if isinstance(raw, str) else None
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ == "str":
            if not isinstance(raw, str):
                raise ValueError
            return raw.strip().lower()
        if typ == "str | None":
            if raw is None or raw == "":
                return None
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except (TypeError, ValueError):
        raise SparseConfigError(f"{source}: cannot read {raw!r} as {typ}") from None
    raise AssertionError(f"unhandled field type {typ} for {name}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SparseConfigError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def load_head_config(path: str) -> tuple[HeadOverride, ...]:
    """Read a per-layer/per-head method file.

    Format (JSON)::

        {"overrides": [
            {"layers": [0, 1], "heads": [0, 3], "prefill_method": "streaming",
             "decode_method": "topk"},
            {"layers": "all", "heads": "all", "prefill_method": "xattention"}
        ]}

    ``layers``/``heads`` may be a list of ints or ``"all"``; later entries win.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise SparseConfigError(f"head_config {path!r}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise SparseConfigError(f"head_config {path!r}: invalid JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"overrides"} or not isinstance(
            doc["overrides"], list):
        raise SparseConfigError(
            f"head_config {path!r}: expected an object {{\"overrides\": [...]}}"
        )
    allowed = {"layers", "heads", "prefill_method", "decode_method"}
    out: list[HeadOverride] = []
    for i, entry in enumerate(doc["overrides"]):
        where = f"head_config {path!r} entry {i}"
        if not isinstance(entry, dict):
            raise SparseConfigError(f"{where}: expected an object")
        extra = set(entry) - allowed
        if extra:
            raise SparseConfigError(f"{where}: unknown keys {sorted(extra)}; valid: {sorted(allowed)}")
        if "prefill_method" not in entry and "decode_method" not in entry:
            raise SparseConfigError(f"{where}: names neither prefill_method nor decode_method")
        layers = _int_list(entry.get("layers", "all"), f"{where} layers")
        heads = _int_list(entry.get("heads", "all"), f"{where} heads")
        pm = entry.get("prefill_method")
        dm = entry.get("decode_method")
        for layer in (layers if layers is not None else (None,)):
            out.append(HeadOverride(layer=layer, heads=heads, prefill_method=pm, decode_method=dm))
    return tuple(out)


def _int_list(v: Any, where: str) -> tuple[int, ...] | None:
    if v == "all":
        return None
    if not isinstance(v, list) or not v or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise SparseConfigError(f"{where}: expected \"all\" or a non-empty list of ints >= 0")
    return tuple(v)


_CACHED: dict[Any, SparseConfig] = {}


def get_config(overrides: Mapping[str, Any] | None = None) -> SparseConfig:
    """Process-wide config: parsed once per distinct (env, overrides) and cached."""
    env_items = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    key = (env_items, json.dumps(dict(overrides or {}), sort_keys=True, default=str))
    cfg = _CACHED.get(key)
    if cfg is None:
        cfg = SparseConfig.from_sources(overrides=overrides)
        _CACHED[key] = cfg
    return cfg

"""Prometheus metrics of the sparse backend on ``vllm serve``'s ``/metrics``.

The backend's counters live in the process that runs the model (vLLM's engine core or, with
tensor parallelism, the rank-0 worker); ``/metrics`` is served by the API server process. The
two meet through a small JSON file:

* the model process writes a snapshot of :data:`vllm_sparse.backend.PATH_COUNTERS` every
  ``SPARSE_SERVE_METRICS_EVERY_S`` seconds (default 5; one device-to-host read of four numbers)
  to ``SPARSE_SERVE_METRICS_FILE`` (atomic replace);
* the plugin, loaded in the API server before the engine starts, picks that path (a file under
  the system temp folder named after the API server's pid) and exports it in the environment,
  which the engine processes inherit, and registers a collector in prometheus_client's default
  registry that reads the file at scrape time.

Exported (names in vLLM's ``prefix:name`` style):

* ``sparse_serve:prefill_chunks_total{path="sparse"|"dense"|"dense_fallback"}`` -- prefill
  chunks by path: sparse estimator + kernel; dense because the sequence is at most
  ``min_seq_len`` tokens or the method is dense; and sparse-eligible chunks whose estimated
  density exceeded ``prefill_dense_above`` (counted on the first layer with a sparse prefill
  method), which ran dense FA3.
* ``sparse_serve:decode_steps_total`` -- forward steps with decode requests.
* ``sparse_serve:decode_kv_tokens_read_total`` and ``..._held_total`` -- KV tokens attended by
  decode and KV tokens those sequences held (summed over layers and KV heads: measured on the
  first top-k layer, weighted by the layers of each decode method); their ratio is
* ``sparse_serve:decode_kv_fraction_read`` -- the fraction of KV read per decode step.
* ``sparse_serve:prefill_blocks_computed_total`` and ``..._causal_total``, and
  ``sparse_serve:prefill_block_density`` -- the same for prefill blocks of sparse-eligible
  chunks, summed over every layer (a layer that head_config keeps dense computes all).
* With selection reuse (``SPARSE_SELECTION_REUSE`` > 1):
  ``sparse_serve:decode_selection_rows_total{selection="kept"|"fresh"}`` -- decode rows that
  kept an earlier step's page selection or selected afresh, and their ratio
  ``sparse_serve:decode_selection_reuse_fraction``.

With several API servers vLLM serves metrics from a multiprocess registry, which this
collector does not join; the numbers are then in the logs only (``sparse-serve stats`` lines).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

METRICS_FILE_ENV = "SPARSE_SERVE_METRICS_FILE"
WRITE_EVERY_S = float(os.environ.get("SPARSE_SERVE_METRICS_EVERY_S", "5"))

_collector = None


def fractions_from_sums(sums) -> dict:
    """The two ratios of the backend's four sums over layers ``[decode KV tokens read, decode KV
    tokens held, prefill blocks computed, prefill causal blocks]`` (``None`` where the
    denominator is 0): also right for differences or totals of such sums."""
    return {"decode_kv_fraction_read": sums[0] / sums[1] if sums[1] else None,
            "prefill_block_density": sums[2] / sums[3] if sums[3] else None}


def metrics_path() -> str:
    """The snapshot file; set in the environment on first use so child processes share it."""
    path = os.environ.get(METRICS_FILE_ENV)
    if not path:
        path = os.path.join(tempfile.gettempdir(), f"sparse_serve_metrics_{os.getpid()}.json")
        os.environ[METRICS_FILE_ENV] = path
    return path


def write_snapshot(snap: dict, path: str | None = None) -> None:
    """Atomically replace the snapshot file with ``snap`` (plus the time written)."""
    path = path or metrics_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(snap, written_at=time.time()), f)
    os.replace(tmp, path)


def read_snapshot(path: str | None = None) -> dict | None:
    try:
        with open(path or metrics_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class SparseServeCollector:
    """prometheus_client collector over the snapshot file (read at every scrape)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self):  # no metrics at registration time: nothing to check against
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = read_snapshot(self.path)
        if snap is None:
            return
        chunks = CounterMetricFamily("sparse_serve:prefill_chunks",
                                     "Prefill chunks by attention path", labels=["path"])
        chunks.add_metric(["sparse"], snap.get("prefill_chunks_sparse", 0)
                          - snap.get("prefill_chunks_dense_fallback", 0))
        chunks.add_metric(["dense"], snap.get("prefill_chunks_dense", 0))
        chunks.add_metric(["dense_fallback"], snap.get("prefill_chunks_dense_fallback", 0))
        yield chunks
        yield CounterMetricFamily("sparse_serve:decode_steps",
                                  "Forward steps with decode requests",
                                  value=snap.get("decode_steps", 0))
        sums = snap.get("device_sums") or [0.0, 0.0, 0.0, 0.0]
        for name, doc, value in (
            ("decode_kv_tokens_read", "KV tokens attended by decode (all layers and KV heads)",
             sums[0]),
            ("decode_kv_tokens_held",
             "KV tokens held by the decoded sequences (all layers and KV heads)",
             sums[1]),
            ("prefill_blocks_computed",
             "Prefill (query, key) blocks computed (all layers and KV heads)",
             sums[2]),
            ("prefill_blocks_causal",
             "Causal prefill blocks of those chunks (all layers and KV heads)",
             sums[3]),
        ):
            yield CounterMetricFamily(f"sparse_serve:{name}", doc, value=value)
        for name, doc, key in (
            ("decode_kv_fraction_read", "Fraction of KV tokens read per decode step",
             "decode_kv_fraction_read"),
            ("prefill_block_density", "Fraction of causal prefill blocks computed",
             "prefill_block_density"),
        ):
            if snap.get(key) is not None:
                yield GaugeMetricFamily(f"sparse_serve:{name}", doc, value=snap[key])
        reuse = snap.get("selection_reuse_sums")
        if reuse is not None:  # (selection reuse on)
            rows = CounterMetricFamily(
                "sparse_serve:decode_selection_rows",
                "Decode rows by page selection: kept (an earlier step's, selection reuse) "
                "or fresh", labels=["selection"])
            rows.add_metric(["kept"], reuse[0])
            rows.add_metric(["fresh"], reuse[1] - reuse[0])
            yield rows
            if snap.get("decode_selection_reuse_fraction") is not None:
                yield GaugeMetricFamily(
                    "sparse_serve:decode_selection_reuse_fraction",
                    "Fraction of decode rows that kept an earlier step's page selection",
                    value=snap["decode_selection_reuse_fraction"])


def register_collector() -> None:
    """Register the collector in prometheus_client's default registry (once per process)."""
    global _collector
    if _collector is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # vLLM depends on prometheus_client; nothing to export without it
        return
    _collector = SparseServeCollector(metrics_path())
    REGISTRY.register(_collector)

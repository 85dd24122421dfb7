"""The sparse backend's Prometheus metrics: counters -> snapshot file -> /metrics text."""

import json

import pytest

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

import torch  # noqa: E402

from sparse_kernels.config import SparseConfig  # noqa: E402
from vllm_sparse import backend, metrics  # noqa: E402


def _scrape(path) -> dict[str, float]:
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.SparseServeCollector(str(path)))
    text = prometheus_client.generate_latest(registry).decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_counters_reach_metrics_text(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    monkeypatch.setenv(metrics.METRICS_FILE_ENV, str(path))
    monkeypatch.setattr(metrics, "WRITE_EVERY_S", 0.0)
    monkeypatch.setattr(backend, "LOG_EVERY_S", 1e9)
    c = backend._PathCounters()
    c.sparse_prefill_reqs, c.dense_prefill_reqs, c.prefill_dense_fallbacks = 5, 7, 2
    c.decode_steps = 11
    c.sums_for(torch.device("cpu")).copy_(torch.tensor([250.0, 1000.0, 30.0, 120.0]))
    c.maybe_report(SparseConfig())
    snap = json.loads(path.read_text())
    assert snap["decode_kv_fraction_read"] == 0.25 and snap["prefill_block_density"] == 0.25
    v = _scrape(path)
    assert v['sparse_serve:prefill_chunks_total{path="sparse"}'] == 3.0  # 5 minus 2 fallbacks
    assert v['sparse_serve:prefill_chunks_total{path="dense"}'] == 7.0
    assert v['sparse_serve:prefill_chunks_total{path="dense_fallback"}'] == 2.0
    assert v["sparse_serve:decode_steps_total"] == 11.0
    assert v["sparse_serve:decode_kv_tokens_read_total"] == 250.0
    assert v["sparse_serve:decode_kv_tokens_held_total"] == 1000.0
    assert v["sparse_serve:prefill_blocks_computed_total"] == 30.0
    assert v["sparse_serve:prefill_blocks_causal_total"] == 120.0
    assert v["sparse_serve:decode_kv_fraction_read"] == 0.25
    assert v["sparse_serve:prefill_block_density"] == 0.25
    assert not any("selection" in k for k in v)  # selection reuse off: no such metrics
    # selection reuse on: kept / fresh decode rows and their ratio
    c.reuse_sums_for(torch.device("cpu")).copy_(torch.tensor([30.0, 40.0]))
    c.maybe_report(SparseConfig(selection_reuse=4))
    v = _scrape(path)
    assert v['sparse_serve:decode_selection_rows_total{selection="kept"}'] == 30.0
    assert v['sparse_serve:decode_selection_rows_total{selection="fresh"}'] == 10.0
    assert v["sparse_serve:decode_selection_reuse_fraction"] == 0.75


def test_no_file_no_metrics_and_rate_limit(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    assert _scrape(path) == {}  # engine not started yet: the scrape still succeeds
    monkeypatch.setenv(metrics.METRICS_FILE_ENV, str(path))
    monkeypatch.setattr(metrics, "WRITE_EVERY_S", 3600.0)
    c = backend._PathCounters()
    c.maybe_report(SparseConfig())
    assert path.exists()  # the first call writes
    c.decode_steps = 3
    c.maybe_report(SparseConfig())
    assert json.loads(path.read_text())["decode_steps"] == 0  # rate-limited
    c.write_metrics = False  # non-zero tensor-parallel ranks never write
    path.unlink()
    c._last_write = float("-inf")
    c.maybe_report(SparseConfig())
    assert not path.exists()


def test_metrics_path_is_inherited_through_the_environment(monkeypatch):
    monkeypatch.delenv(metrics.METRICS_FILE_ENV, raising=False)
    p = metrics.metrics_path()
    import os

    assert os.environ[metrics.METRICS_FILE_ENV] == p and str(os.getpid()) in p
    assert metrics.metrics_path() == p

"""CPU smoke run of benchmarks/bench_decode_engine.py (TRITON_INTERPRET=1, tiny shapes): the
script runs every plan and variant and its self-check holds: where rows read every page (short
and dense rows), every top-k plan's output equals the dense path's."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(monkeypatch):
    # the script runs from benchmarks/ (python3 benchmarks/bench_decode_engine.py): its
    # sibling modules import from there
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_decode_engine", ROOT / "benchmarks" / "bench_decode_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="CPU smoke run needs TRITON_INTERPRET=1")
def test_bench_decode_engine_smoke(tmp_path, monkeypatch):
    bench = _load(monkeypatch)
    out = tmp_path / "de.json"
    # budget 64 tokens at page 16: 4 pages; 40 tokens -> 3 pages (short row), 100 -> 7
    # (dense: at most 2x the budget), 300 -> 19 (sparse); a table 24 pages wide
    bench.main(["--contexts", "40", "100", "300", "--batches", "2", "--budget", "64",
                "--sink-tokens", "16", "--local-tokens", "16", "--table-pages", "24", "--layers", "2", "--num-q-heads", "4",
                "--num-kv-heads", "2", "--head-dim", "64", "--iters", "1",
                "--variants", "max_splits16", "min_tiles4", "chunk128", "balanced_p4",
                "balanced_bf16", "--variant-plans", "dense", "topk_auto", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [40, 100, 300]
    kinds = [r["row_kind"].split()[0] for r in rows]
    assert kinds == ["short", "dense", "sparse"], kinds
    for r in rows:
        assert r["table_pages"] == 24 and r["layers"] == 2
        assert {"dense", "topk_auto", "topk_single", "topk_fused", "select_auto",
                "attention_only", "topk_auto+max_splits16", "score_only",
                "score_only_fused_summary", "score_only+chunk128",
                "topk_only", "kv_write_sparse"} <= set(r["us_per_layer"])
        # each plan's timed output (every launch, side-stream ones included) is its own
        replay = r["max_abs_diff_replay_vs_eager"]
        assert set(replay) >= {"dense", "topk_auto", "topk_auto_serial", "topk_auto+min_tiles4",
                               "dense+balanced_p4", "topk_auto+balanced_p4",
                               "topk_auto+balanced_bf16"}
        assert all(v == 0 for v in replay.values()), replay
        assert "topk_auto_kept" in replay and r["max_abs_diff_kept_vs_topk_auto"] == 0
        diffs = r["max_abs_diff_vs_dense"]
        if r["row_kind"].startswith(("short", "dense")):
            assert max(diffs.values()) < 1e-2, diffs
        else:  # sparse rows read 4 of 19 pages: not the dense answer
            assert diffs["topk_auto"] > 1e-3, diffs

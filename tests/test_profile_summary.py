"""benchmarks/profile_summary.py on a hand-made Chrome trace: groups, per-step division and the
GPU's busy time over overlapping streams."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "profile_summary", ROOT / "benchmarks" / "profile_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _k(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"stream": stream}}


def test_summary_of_two_steps(tmp_path):
    ps = _load()
    events = []
    for step in range(2):
        t = step * 1000.0
        events += [
            _k("_write_kv_kernel", t, 3),
            _k("nvjet_tst_128x256_gemm", t + 5, 100),
            _k("_sparse_decode_kernel", t + 110, 100),          # main stream
            _k("_select_fused_kernel", t + 110, 4, stream=9),   # beside it, side stream
            _k("_topk_pages_kernel", t + 115, 2, stream=9),
            _k("_merge_splits_kernel", t + 210, 5),
            _k("triton_poi_fused_add_0", t + 220, 10),
        ]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000})
    path = tmp_path / "w.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = ps.summarize(ps.load_trace(path), steps=2)
    assert s["kernels"] == 14  # the CPU op is not a kernel
    g = s["groups"]
    assert g["sparse decode attention"] == {"us_per_step": 105.0, "launches_per_step": 2.0}
    assert g["sparse selection"]["us_per_step"] == 6.0
    assert g["sparse KV write + summaries"]["us_per_step"] == 3.0
    assert g["GEMM"]["us_per_step"] == 100.0
    assert g["other"]["us_per_step"] == 10.0
    assert s["kernel_sum_us_per_step"] == 224.0
    # busy: 3 + 100 + 100 (the side kernels overlap it) + 5 + 10 = 218 per step
    assert s["busy_us_per_step"] == 218.0
    assert s["span_us_per_step"] == pytest.approx((1230.0 - 0.0) / 2)
    assert s["top_kernels"][0]["name"] in ("_sparse_decode_kernel", "nvjet_tst_128x256_gemm")
    # the command line: a folder of traces, JSON out
    out = tmp_path / "s.json"
    assert ps.main([str(tmp_path), "--steps", "2", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["traces"].values())[0]["busy_us_per_step"] == 218.0
    assert ps.main([str(tmp_path / "none")]) == 1


def test_busy_union():
    ps = _load()
    assert ps.busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert ps.busy_us([]) == 0


def test_steady_steps():
    """Steps between sampler kernels; the first two and the last left out; the main stream is
    the busiest, a kernel on another is a branch."""
    ps = _load()
    events = []
    for step in range(6):
        t = step * 1000.0
        events += [_k("_write_kv_kernel", t, 3), _k("_select_fused_kernel", t + 4, 5),
                   _k("_sparse_decode_kernel", t + 4, 100 + step, stream=31),
                   _k("nvjet_gemm", t + 110, 80), _k("_gumbel_sample_kernel", t + 200, 10)]
    st = ps.steady_steps({"traceEvents": events}, r"_gumbel_sample")
    # marks at 200, 1200, ..., 5200: 5 intervals, skip 2 and the last: 2 steps (3 and 4)
    assert st["steps"] == 2
    rows = {(r["name"], r["stream"]): r for r in st["kernels"]}
    assert rows[("_sparse_decode_kernel", "branch")]["us_per_step"] == 103.5  # 103, 104
    assert rows[("_write_kv_kernel", "main")]["launches_per_step"] == 1
    assert st["groups_us"]["GEMM"] == 80
    assert st["span_us"] == 210.0  # from the step's first kernel (write) to the marker's end
    assert ps.steady_steps({"traceEvents": events[:5]}, r"_gumbel_sample") == {"steps": 0}

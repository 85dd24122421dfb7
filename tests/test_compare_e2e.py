"""benchmarks/compare_e2e.py: CUSTOM files pair with the FLASH_ATTN file of their engine and
round in the same folder; ratios are FLASH_ATTN time over CUSTOM time."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("compare_e2e",
                                                  ROOT / "benchmarks" / "compare_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(folder: Path, name: str, tpots, step):
    folder.mkdir(parents=True, exist_ok=True)
    d = {"rows": [{"input_len": 4096, "tpot_ms": min(tpots), "tpot_all_ms": tpots}],
         "decode_batch": {"step_ms": step} if step else None}
    (folder / name).write_text(json.dumps(d))


def test_pairs_by_engine_round_and_folder(tmp_path, capsys):
    cmp = _load()
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "e2e_FLASH_ATTN_128k_r1.json", [10.0, 12.0], 9.0)
    _write(a, "e2e_CUSTOM_128k_default_r1.json", [8.0, 8.0], 10.0)
    _write(a, "e2e_FLASH_ATTN_128k_r2.json", [10.0], 9.9)
    _write(a, "e2e_CUSTOM_128k_default_r2.json", [10.0], 9.0)
    _write(a, "e2e_CUSTOM_4k_triton_r1.json", [5.0], 5.0)  # no 4k FLASH_ATTN in a: unpaired
    _write(b, "e2e_FLASH_ATTN_4k.json", [6.0], 9.5)  # another machine: pairs only there
    _write(b, "e2e_CUSTOM_4k_auto.json", [6.0], 9.5)
    recs = {(Path(r["folder"]).name, r["engine"], r["setting"], r["round"]): r
            for r in cmp.compare([str(a), str(b)])}
    assert set(recs) == {("a", "128k", "default", "1"), ("a", "128k", "default", "2"),
                         ("b", "4k", "auto", "1")}
    r1 = recs[("a", "128k", "default", "1")]
    assert r1["b1"][4096] == pytest.approx((10.0 / 8.0, 11.0 / 8.0))
    assert r1["b16"] == pytest.approx(0.9)
    assert recs[("a", "128k", "default", "2")]["b16"] == pytest.approx(1.1)
    assert recs[("b", "4k", "auto", "1")]["b16"] == pytest.approx(1.0)
    assert cmp.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "b16 128k default: median 1.000x over 2 (range 0.900-1.100)" in out
    assert cmp.main([str(tmp_path / "empty")]) == 1


def test_batch_that_missed_the_cache_is_left_out(tmp_path, capsys):
    """A batch row marked ``cache_hits: false`` (the batch did not fit in the KV cache) gives
    no decode-step ratio; its batch-1 rows still pair."""
    cmp = _load()
    _write(tmp_path, "e2e_FLASH_ATTN.json", [12.0], 34.8)
    _write(tmp_path, "e2e_CUSTOM.json", [8.0], 21.8)
    path = tmp_path / "e2e_CUSTOM.json"
    d = json.loads(path.read_text())
    d["decode_batch"]["cache_hits"] = False
    path.write_text(json.dumps(d))
    (rec,) = cmp.compare([str(tmp_path)])
    assert rec["b16"] is None
    assert rec["b1"][4096] == pytest.approx((1.5, 1.5))
    assert "missed the prefix cache" in capsys.readouterr().out


def test_pooled_steps_prefer_the_in_run_steps(tmp_path):
    """Files with in-run decode steps (``step_ms_in_run_all``) pool those, not the wall-time
    differences (``step_ms_all``), which carry the eager cached pass's noise."""
    cmp = _load()
    for name, in_run, diff in (("e2e_FLASH_ATTN.json", [9.5, 9.6], [9.8, 9.3]),
                               ("e2e_CUSTOM.json", [9.8, 9.9], [10.6, 8.8])):
        d = {"rows": [], "decode_batch": {"step_ms": in_run[0], "step_ms_in_run_all": in_run,
                                          "step_ms_all": diff}}
        (tmp_path / name).write_text(json.dumps(d))
    (rec,) = cmp.compare([str(tmp_path)])
    assert rec["b16_all"] == [9.8, 9.9] and rec["dense_b16_all"] == [9.5, 9.6]

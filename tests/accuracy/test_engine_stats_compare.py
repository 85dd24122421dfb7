"""Accuracy harness: per-length density statistics from the sparse backend's counters
(``--engine-stats``), generated token ids, the token-match comparison (compare.py), sample
preparation (parallel, cached), partial JSONs, and the device script's argument checks.

CPU only, no model: the character tokenizer, the built-in filler, fake generators and a fake
counters object shaped like ``vllm_sparse.backend._PathCounters``. The real counters class is
used where vLLM is installed (skipped otherwise).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ACC = REPO / "benchmarks" / "accuracy"
sys.path.insert(0, str(ACC))
import compare as C  # noqa: E402
import run_accuracy as RA  # noqa: E402
import tasks as T  # noqa: E402

CHAR = T.CharTokenizer()
OPTS = T.TaskOptions(haystack="builtin")
BASE = ["--model", "m", "--haystack", "builtin", "--no-progress", "--samples", "3",
        "--depths", "0", "1", "--tasks", "niah", "qa"]


# --- a stand-in for vllm_sparse.backend._PathCounters ------------------------------------


class FakeSums:
    """The four device sums: in-place zero_() and tolist(), like the CUDA tensor."""

    def __init__(self):
        self.v = [0.0] * 4

    def zero_(self):
        self.v[:] = [0.0] * 4
        return self

    def tolist(self):
        return list(self.v)


class FakeCounters:
    def __init__(self):
        self.device_sums = FakeSums()
        self.decode_steps = 0
        self.sparse_prefill_reqs = 0

    def snapshot(self):
        s = self.device_sums.tolist()
        return {"prefill_chunks_sparse": self.sparse_prefill_reqs, "decode_steps": self.decode_steps,
                "decode_kv_fraction_read": s[0] / s[1] if s[1] else None,
                "prefill_block_density": s[2] / s[3] if s[3] else None}


READ = {2048: 0.5, 4096: 0.25}  # decode fraction read per length, as the fake engine does it
DENSITY = {2048: 0.6, 4096: None}  # None: no sparse prefill at that length


def engine_for(counters):
    """A generator that 'runs' the samples and accumulates what the backend would."""

    def gen(samples, max_tokens):
        for s in samples:
            held = float(s.input_tokens)
            counters.device_sums.v[0] += READ[s.length] * held
            counters.device_sums.v[1] += held
            if DENSITY[s.length] is not None:
                counters.device_sums.v[2] += DENSITY[s.length] * 100
                counters.device_sums.v[3] += 100
                counters.sparse_prefill_reqs += 1
        counters.decode_steps += 7
        return [{"text": " " + ", ".join(s.answers), "token_ids": [s.index, len(s.answers)]}
                for s in samples]

    return gen


def test_engine_stats_per_length(tmp_path):
    c = FakeCounters()
    c.device_sums.v[:] = [9e9, 1e9, 5.0, 5.0]  # left by the engine's warm-up / graph capture
    c.decode_steps = 1000
    out = tmp_path / "s.json"
    doc = RA.main(BASE + ["--backend", "CUSTOM", "--engine-stats", "--lengths", "2048", "4096",
                          "--prefill-block-density", "1.0", "--decode-kv-fraction-read", "0.9",
                          "--sparse-env", "SPARSE_TOKEN_BUDGET=2048", "--out", str(out)],
                  generate=engine_for(c), engine={"name": "fake"}, tok=CHAR,
                  stats_counters=lambda: c)
    by_len = {e["length"]: e for e in doc["summary"]["by_length"]}
    # measured values win over --decode-kv-fraction-read; the warm-up sums were zeroed
    assert by_len[2048]["decode_kv_fraction_read"] == pytest.approx(0.5)
    assert by_len[4096]["decode_kv_fraction_read"] == pytest.approx(0.25)
    assert by_len[2048]["prefill_block_density"] == pytest.approx(0.6)
    # no sparse prefill measured at 4096: the command line's value stays
    assert by_len[4096]["prefill_block_density"] == 1.0
    es = {e["length"]: e for e in doc["engine_stats"]["by_length"]}
    assert es[2048]["decode_steps"] == 14 and es[4096]["decode_steps"] == 14  # 2 calls x 7
    assert es[2048]["prefill_chunks_sparse"] == 6 and es[4096]["prefill_chunks_sparse"] == 0
    assert es[4096]["prefill_block_density"] is None
    assert len(es[2048]["sums"]) == 4
    # top level: over all lengths, weighted by the KV held
    held = {L: sum(s["input_tokens"] for s in doc["samples"] if s["length"] == L) for L in READ}
    want = sum(READ[L] * held[L] for L in READ) / sum(held.values())
    assert doc["decode_kv_fraction_read"] == pytest.approx(want, rel=1e-5)
    assert doc["prefill_block_density"] == pytest.approx(0.6)
    assert json.loads(out.read_text())["engine_stats"]["by_length"][1]["length"] == 4096
    assert doc["config"]["engine_stats"] is True and doc["partial"] is False
    sc = doc["config"]["sparse_config"]  # the config the environment gives, for the record
    assert sc.get("token_budget") == 2048 or "No module named 'sparse_kernels'" in sc.get("error", "")


def test_engine_stats_need_the_sparse_backend(tmp_path, capsys):
    def boom():
        raise AssertionError("counters must not be read for a dense backend")

    doc = RA.main(BASE + ["--backend", "FLASH_ATTN", "--engine-stats", "--lengths", "2048",
                          "--decode-kv-fraction-read", "1.0", "--out", str(tmp_path / "d.json")],
                  generate=engine_for(FakeCounters()), engine={"name": "fake"}, tok=CHAR,
                  stats_counters=boom)
    assert doc["engine_stats"] is None
    assert doc["summary"]["by_length"][0]["decode_kv_fraction_read"] == 1.0
    assert "not the sparse backend" in capsys.readouterr().err


def test_engine_stats_failure_does_not_stop_the_run(tmp_path, capsys):
    class Broken:
        device_sums = None

        def snapshot(self):
            raise RuntimeError("no counters here")

    doc = RA.main(BASE + ["--backend", "CUSTOM", "--engine-stats", "--lengths", "2048",
                          "--out", str(tmp_path / "b.json")],
                  generate=engine_for(FakeCounters()), engine={"name": "fake"}, tok=CHAR,
                  stats_counters=Broken)
    assert doc["summary"]["overall"] == 1.0
    st = doc["engine_stats"]["by_length"][0]
    assert st["decode_kv_fraction_read"] is None and "no counters here" in st["error"]
    assert "--engine-stats failed" in capsys.readouterr().err


def test_engine_stats_sets_inprocess_engine(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    args = RA.build_parser().parse_args(["--model", "m", "--backend", "CUSTOM", "--engine-stats"])
    assert RA._engine_stats_wanted(args)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert not RA._engine_stats_wanted(args)


def test_engine_stats_zero_in_place():
    torch = pytest.importorskip("torch")
    c = FakeCounters()
    # The engine allocates the sums while running the model, under torch.inference_mode:
    # an inference tensor, which refuses in-place updates outside that mode.
    with torch.inference_mode():
        c.device_sums = torch.tensor([3.0, 4.0, 1.0, 2.0], dtype=torch.float64)
    before = c.device_sums
    st = RA.EngineStats(lambda: c)
    st.reset()
    assert c.device_sums is before and before.tolist() == [0.0] * 4  # CUDA graphs keep the address
    with torch.inference_mode():
        before += torch.tensor([1.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    r = st.read()
    assert r["decode_kv_fraction_read"] == 0.25 and r["prefill_block_density"] is None
    assert r["sums"] == [1.0, 4.0, 0.0, 0.0]


def test_engine_stats_real_backend_counters(monkeypatch):
    """The interface EngineStats relies on, against the backend's own class."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    from vllm_sparse import backend

    monkeypatch.setattr(backend, "PATH_COUNTERS", backend._PathCounters())
    st = RA.EngineStats()  # looks backend.PATH_COUNTERS up on every call
    st.reset()  # before the first forward: no sums yet
    assert st.read()["decode_kv_fraction_read"] is None
    sums = backend.PATH_COUNTERS.sums_for(torch.device("cpu"))
    sums += torch.tensor([10.0, 40.0, 3.0, 4.0], dtype=torch.float64)
    backend.PATH_COUNTERS.decode_steps += 5
    r = st.read()
    assert r["decode_kv_fraction_read"] == 0.25 and r["prefill_block_density"] == 0.75
    assert r["decode_steps"] == 5
    st.reset()
    assert backend.PATH_COUNTERS.device_sums is sums and sums.tolist() == [0.0] * 4
    r = st.read()
    assert r["decode_kv_fraction_read"] is None and r["decode_steps"] == 0
    assert "decode_selection_reuse_fraction" not in r  # reuse off: the builder made no counters
    # Selection reuse on: the builder's counters, zeroed in place by reset() as well.
    reuse = backend.PATH_COUNTERS.reuse_sums_for(torch.device("cpu"))
    reuse += torch.tensor([9.0, 12.0], dtype=torch.float64)
    r = st.read()
    assert r["selection_reuse_sums"] == [9.0, 12.0] and r["decode_selection_reuse_fraction"] == 0.75
    st.reset()
    assert backend.PATH_COUNTERS.reuse_sums is reuse and reuse.tolist() == [0.0, 0.0]
    r = st.read()
    assert r["decode_selection_reuse_fraction"] is None


# --- generated token ids ---------------------------------------------------------------------


def test_token_ids_stored(tmp_path):
    doc = RA.main(BASE + ["--lengths", "2048", "--out", str(tmp_path / "t.json")],
                  generate=engine_for(FakeCounters()), engine={"name": "fake"}, tok=CHAR)
    assert all(s["token_ids"] == [s["index"], 1] for s in doc["samples"])
    doc = RA.main(BASE + ["--lengths", "2048", "--out", str(tmp_path / "u.json")],
                  generate=lambda ss, mt: ["x"] * len(ss), engine={"name": "fake"}, tok=CHAR)
    assert all(s["token_ids"] is None for s in doc["samples"])
    assert RA._split_output(("a", (1, 2))) == ("a", [1, 2])


def test_dry_engine_is_an_oracle(tmp_path):
    doc = RA.main(BASE + ["--engine", "dry", "--lengths", "2048", "--out", str(tmp_path / "y.json")],
                  tok=CHAR)
    assert doc["summary"]["overall"] == 1.0
    s = doc["samples"][0]
    assert CHAR.decode(s["token_ids"]).startswith(" " + s["answers"][0][:5])


# --- compare.py ------------------------------------------------------------------------------


def _ids(s):
    return [s.index, 100 + len(s.answers), 7, 7, 7, 7, 7, 7, 7, 9]


def _ref_gen(samples, max_tokens):
    return [{"text": " " + s.answers[0], "token_ids": _ids(s)} for s in samples]


def _run_gen(samples, max_tokens):
    """index 0: differs in the 10th id only; index 1: in the first; index 2: equal."""
    outs = []
    for s in samples:
        ids = _ids(s)
        text = " " + s.answers[0]
        if s.index == 0:
            ids[9] = 10
        elif s.index == 1:
            ids[0] = -1
            text = " wrong"
        outs.append({"text": text, "token_ids": ids})
    return outs


def test_token_match(tmp_path, capsys):
    ref = RA.main(BASE + ["--lengths", "2048", "4096", "--out", str(tmp_path / "ref.json")],
                  generate=_ref_gen, engine={"name": "fake"}, tok=CHAR)
    run = RA.main(BASE + ["--lengths", "2048", "4096", "--out", str(tmp_path / "run.json")],
                  generate=_run_gen, engine={"name": "fake"}, tok=CHAR)
    m = C.token_match(ref, run)
    assert [e["length"] for e in m["by_length"]] == [2048, 4096]
    for e in m["by_length"]:
        assert e["n"] == 6  # 2 tasks x 3 samples
        assert e["exact"] == pytest.approx(1 / 3)  # only index 2
        assert e["first8"] == pytest.approx(2 / 3)  # index 0 differs after 8 ids
        assert e["mean_common_prefix"] == pytest.approx((9 + 0 + 10) / 3, abs=1e-3)
        assert e["accuracy_ref"] == 1.0 and e["accuracy"] == pytest.approx(2 / 3)
        assert e["score_agree"] == pytest.approx(2 / 3)
    assert m["overall"]["n"] == 12 and m["overall"]["exact"] == pytest.approx(1 / 3)
    assert C.token_match(ref, ref)["overall"]["exact"] == 1.0
    # CLI: the JSON file, and the text
    out = C.main([str(tmp_path / "ref.json"), str(tmp_path / "run.json"), "--json",
                  str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["overall"] == out["overall"]
    assert "exact 0.333" in capsys.readouterr().out


def test_token_match_pairs_and_missing_ids(tmp_path):
    ref = RA.main(BASE + ["--lengths", "2048", "--out", str(tmp_path / "a.json")],
                  generate=_ref_gen, engine={"name": "fake"}, tok=CHAR)
    run = json.loads(json.dumps(ref))
    run["samples"][0]["token_ids"] = None  # e.g. a server run
    run["samples"][1]["index"] = 99  # no partner
    m = C.token_match(ref, run)
    assert m["missing_token_ids"] == 1 and m["unpaired"] == 1
    assert m["overall"]["n"] == len(ref["samples"]) - 2 and m["overall"]["exact"] == 1.0


def test_summary_lines(tmp_path, capsys):
    c = FakeCounters()
    RA.main(BASE + ["--backend", "CUSTOM", "--engine-stats", "--lengths", "2048", "4096",
                    "--out", str(tmp_path / "s.json"), "--method", "fake sparse"],
            generate=engine_for(c), engine={"name": "fake"}, tok=CHAR, stats_counters=lambda: c)
    capsys.readouterr()
    C.main(["--summary", str(tmp_path / "s.json")])
    text = capsys.readouterr().out
    assert "fake sparse" in text and "decode KV read 0.500" in text and "decode_steps=14" in text


# --- samples: parallel and cached ------------------------------------------------------------


def test_prepare_groups_parallel_equals_serial():
    serial = {(t, L): T.generate_samples(CHAR, t, L, 4, seed=3, depths=[0.0, 0.5], opts=OPTS)
              for L in (2048, 3000) for t in ("niah", "vt")}
    par = RA.prepare_groups(CHAR, ["niah", "vt"], [2048, 3000], 4, depths=[0.0, 0.5], seed=3,
                            opts=OPTS, workers=3, chunk=1)
    assert set(par) == set(serial)
    for k in serial:
        assert [s.prompt_token_ids for s in par[k]] == [s.prompt_token_ids for s in serial[k]]
        assert [(s.index, s.depth, s.answers) for s in par[k]] == \
            [(s.index, s.depth, s.answers) for s in serial[k]]


def test_sample_cache(tmp_path, monkeypatch):
    first = RA.prepare_groups(CHAR, ["niah"], [2048], 3, opts=OPTS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("niah_2048_3_*.pkl"))) == 1

    def no_generation(*a, **k):
        raise AssertionError("cached samples were generated again")

    monkeypatch.setattr(T, "make_sample", no_generation)
    again = RA.prepare_groups(CHAR, ["niah"], [2048], 3, opts=OPTS, cache_dir=tmp_path)
    assert [s.prompt for s in again[("niah", 2048)]] == [s.prompt for s in first[("niah", 2048)]]
    with pytest.raises(AssertionError, match="generated again"):  # another seed: a miss
        RA.prepare_groups(CHAR, ["niah"], [2048], 3, seed=1, opts=OPTS, cache_dir=tmp_path)


# --- partial results, limits -----------------------------------------------------------------


def test_partial_json_after_each_length(tmp_path):
    out = tmp_path / "p.json"

    def dies_at_4096(samples, max_tokens):
        if samples[0].length == 4096:
            raise KeyboardInterrupt  # the device script's timeout, say
        return _ref_gen(samples, max_tokens)

    with pytest.raises(KeyboardInterrupt):
        RA.main(BASE + ["--lengths", "2048", "4096", "--out", str(out)],
                generate=dies_at_4096, engine={"name": "fake"}, tok=CHAR)
    doc = json.loads(out.read_text())
    assert doc["partial"] is True
    assert {s["length"] for s in doc["samples"]} == {2048}
    assert [e["length"] for e in doc["summary"]["by_length"]] == [2048]
    assert "2048" in doc["timing"]["by_length"]


def test_samples_must_fit_max_model_len(tmp_path):
    called = []
    with pytest.raises(SystemExit, match="max-model-len"):
        RA.main(BASE + ["--lengths", "2048", "--max-model-len", "2000", "--out",
                        str(tmp_path / "x.json")],
                generate=lambda ss, mt: called.append(1), engine={"name": "fake"}, tok=CHAR)
    assert not called


def test_plots_from_engine_stats(tmp_path):
    pytest.importorskip("matplotlib")
    import plot as P

    c = FakeCounters()
    RA.main(BASE + ["--backend", "CUSTOM", "--engine-stats", "--lengths", "2048", "4096",
                    "--prefill-block-density", "1.0", "--out", str(tmp_path / "s.json")],
            generate=engine_for(c), engine={"name": "fake"}, tok=CHAR, stats_counters=lambda: c)
    runs = P.load_runs([tmp_path / "s.json"])
    pts = P.fraction_points(runs, "decode_kv_fraction_read")
    assert sorted((x, L) for x, _, L in pts["CUSTOM"]) == [(0.25, 4096), (0.5, 2048)]
    written = P.main([str(tmp_path / "s.json"), "--out-dir", str(tmp_path / "plots")])
    assert {"accuracy_vs_decode_kv.png", "accuracy_vs_prefill_density.png"} <= {w.name for w in written}


# --- the device script -----------------------------------------------------------------------


def test_device_script_rejects_unknown_config(tmp_path):
    script = REPO / "benchmarks" / "device" / "accuracy_vllm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", str(script), "dense", "bogus"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown config 'bogus'" in r.stdout


def test_by_depth_table(tmp_path, capsys):
    """compare.py --by-depth: correct samples per (task, length, depth), one column per run.
    Depths 0 and 1 cycle over the 3 samples (indices 0, 2 at depth 0; 1 at depth 1); the run
    answers index 1 wrong."""
    ref = RA.main(BASE + ["--lengths", "2048", "--out", str(tmp_path / "ref.json")],
                  generate=_ref_gen, engine={"name": "fake"}, tok=CHAR)
    run = RA.main(BASE + ["--lengths", "2048", "--out", str(tmp_path / "run.json")],
                  generate=_run_gen, engine={"name": "fake"}, tok=CHAR)
    table = C.by_depth([ref, run])
    assert table[("niah", 2048, 0.0)] == [2.0, 2.0]
    assert table[("niah", 2048, 1.0)] == [1.0, 0.0]
    assert set(table) == {(t, 2048, d) for t in ("niah", "qa") for d in (0.0, 1.0)}
    out = C.main(["--by-depth", str(tmp_path / "ref.json"), str(tmp_path / "run.json"),
                  "--task", "qa"])
    assert set(out) == {("qa", 2048, 0.0), ("qa", 2048, 1.0)}
    assert "qa" in capsys.readouterr().out
    # A run without a task has no sum for its cells ("-"), not a sum of 0.
    only_niah = dict(run, samples=[s for s in run["samples"] if s["task"] == "niah"])
    table = C.by_depth([ref, only_niah])
    assert table[("qa", 2048, 0.0)][1] is None and table[("niah", 2048, 1.0)][1] == 0.0
    lines = C.by_depth_lines([ref, only_niah], table)
    assert lines[-1].split()[-1] == "-" and lines[-1].split()[1] == "2048"


def test_sign_test_p():
    """Exact two-sided sign test: 0 of 5 -> 2 / 32; a tie -> 1; symmetric; 8 vs 17 by hand."""
    assert C.sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert C.sign_test_p(5, 0) == C.sign_test_p(0, 5)
    assert C.sign_test_p(3, 3) == 1.0 and C.sign_test_p(0, 0) == 1.0
    tail = sum(__import__("math").comb(25, i) for i in range(9)) / 2 ** 25
    assert C.sign_test_p(8, 17) == pytest.approx(2 * tail)


def _doc(name, scores):
    """A minimal accuracy doc: {(task, length): [score per index]}."""
    samples = [{"task": t, "length": L, "depth": None, "index": i, "score": x}
               for (t, L), xs in scores.items() for i, x in enumerate(xs)]
    return {"name": name, "method": name, "samples": samples, "summary": {}}


def test_cell_differences(tmp_path, capsys):
    """compare.py --cells: paired differences per cell, their 95% interval and sign test; runs
    joined from two files with '+'; the same sample twice in a join is refused."""
    ref = _doc("ref", {("niah", 8192): [1, 1, 1, 1], ("cwe", 8192): [0.5, 0.5, 1.0, 0.0]})
    run = _doc("run", {("niah", 8192): [1, 0, 1, 0], ("cwe", 8192): [0.5, 1.0, 1.0, 0.0]})
    c = C.cell_differences(ref, run)
    cells = {(e["task"], e["length"]): e for e in c["cells"]}
    niah = cells[("niah", 8192)]
    assert niah["n"] == 4 and niah["accuracy_ref"] == 1.0 and niah["accuracy"] == 0.5
    assert niah["diff_points"] == -50.0 and (niah["better"], niah["worse"]) == (0, 2)
    # d = [0, -1, 0, -1]: mean -0.5, sd sqrt(1/3); 1.96 * sd / 2 = 0.5658
    lo, hi = niah["ci95_points"]
    assert lo == pytest.approx(-50 - 56.58, abs=0.01) and hi == pytest.approx(-50 + 56.58, abs=0.01)
    assert niah["sign_test_p"] == pytest.approx(0.5)
    cwe = cells[("cwe", 8192)]
    assert cwe["diff_points"] == 12.5 and (cwe["better"], cwe["worse"]) == (1, 0)
    assert c["mean_diff_points"] == pytest.approx((-50 + 12.5) / 2)
    assert c["worst"]["task"] == "niah"
    # joined files, through the CLI
    for name, doc in (("ref", ref), ("run", run)):
        for task in ("niah", "cwe"):
            part = dict(doc, samples=[s for s in doc["samples"] if s["task"] == task])
            (tmp_path / f"{name}_{task}.json").write_text(json.dumps(part))
    j = lambda n: f"{tmp_path / (n + '_niah.json')}+{tmp_path / (n + '_cwe.json')}"  # noqa: E731
    out = C.main(["--cells", j("ref"), j("run"), "--json", str(tmp_path / "cells.json")])
    assert out[0]["cells"] == c["cells"]
    assert json.loads((tmp_path / "cells.json").read_text())[0]["worst"]["task"] == "niah"
    text = capsys.readouterr().out
    assert "mean over cells -18.8 points; worst cell niah 8192: -50.0" in text
    with pytest.raises(SystemExit, match="same sample"):
        C.load_joined(f"{tmp_path / 'ref_niah.json'}+{tmp_path / 'ref_niah.json'}")


def test_device_script_env_configs(tmp_path):
    """accuracy_vllm.sh env:K=V[,K=V] configs: malformed ones and values SparseConfig refuses
    stop the script (exit 2) before any engine; a valid one passes on to the model check."""
    script = REPO / "benchmarks" / "device" / "accuracy_vllm.sh"
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), ACC_DRY="1",
               PY=sys.executable, MODEL=str(tmp_path / "no-model"))

    def run(config):
        return subprocess.run(["bash", str(script), config], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    r = run("env:FOO=1")
    assert r.returncode == 2 and "expected env:SPARSE_NAME=VALUE" in r.stdout
    r = run("env:SPARSE_XATTN_THRESHOLD=2")
    assert r.returncode == 2 and "xattn_threshold must be in (0, 1]" in r.stdout
    r = run("env:SPARSE_XATTN_THRESHOLD=0.97,SPARSE_PREFILL_DENSE_ABOVE=0.5")
    assert r.returncode == 1 and "no model at MODEL=" in r.stdout


def test_device_script_long_config_lists_get_a_short_tag(tmp_path):
    """Four long env: configs make a tag of ~400 characters: the summary file's name is cut
    (and hashed) so that tee can write it, and the script goes on to the model check."""
    script = REPO / "benchmarks" / "device" / "accuracy_vllm.sh"
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), ACC_DRY="1",
               PY=sys.executable, MODEL=str(tmp_path / "no-model"))
    env.pop("TAG", None)
    configs = [f"env:SPARSE_PREFILL_METHOD=vertical_slash,SPARSE_VS_VERTICAL={v},"
               f"SPARSE_VS_SLASH={v},SPARSE_XATTN_THRESHOLD=0.9{i}"
               for i, v in enumerate((64, 128, 256, 512))]
    r = subprocess.run(["bash", str(script), *configs], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no model at MODEL=" in r.stdout, r.stdout + r.stderr
    assert "File name too long" not in r.stderr
    (summary,) = out.glob("accuracy_summary_*.txt")
    assert len(summary.name) < 120 and "no model at MODEL=" in summary.read_text()


def test_accuracy_queue_limits_runs_and_waits_for_each_engine(tmp_path):
    """accuracy_queue.sh: at most MAXJ runs at once, each run starts only after the previous
    run's engine log says 'init engine' (or that run ended), every run gets its own OUT and
    WORK and an exit status file."""
    script = REPO / "benchmarks" / "device" / "accuracy_queue.sh"
    events = tmp_path / "events.txt"
    # a run: records its start, 'starts an engine' for 1 s, then 'serves' for 4 s
    run = (f"echo start $(date +%s.%N) >> {events}; mkdir -p $WORK/logs; sleep 1; "
           f"echo 'init engine took 1 s' > $WORK/logs/c.log; echo up $(date +%s.%N) >> {events}; "
           f"sleep 4; echo done $(date +%s.%N) >> {events}; touch $OUT/result.json")
    queue = tmp_path / "queue.txt"
    queue.write_text("# a comment\n\n" + "".join(f"r{i} {run}\n" for i in range(4))
                     + "bad exit 3\n")
    res = tmp_path / "res"
    env = dict(os.environ, RES=str(res), MAXJ="2", ACC_DRY="1", START_WAIT_S="30",
               SAMPLE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(["bash", str(script), str(queue)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(4):
        assert (res / f"r{i}.rc").read_text().strip() == "0"
        assert (res / f"r{i}" / "result.json").is_file()
    assert (res / "bad.rc").read_text().strip() == "3"
    ev = sorted((float(t), kind) for kind, t in
                (line.split() for line in events.read_text().splitlines()))
    live = peak = 0
    for _, kind in ev:
        live += {"start": 1, "done": -1}.get(kind, 0)
        peak = max(peak, live)
    assert peak == 2  # two at once, never three
    starts = [t for t, k in ev if k == "start"]
    ups = [t for t, k in ev if k == "up"]
    assert all(starts[i + 1] >= ups[i] for i in range(3))  # never during an engine start


def _fake_python(tmp_path, first_error: str):
    """A PY for accuracy_vllm.sh: run_accuracy.py fails once with ``first_error`` and then
    succeeds (writing nothing); the model precondition check passes; the rest is Python."""
    count = tmp_path / "engine_starts"
    fake = tmp_path / "fakepy"
    fake.write_text(f"""#!/bin/bash
case " $* " in
  *run_accuracy.py*)
    n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
    if [ "$n" = 0 ]; then echo "{first_error}"; exit 1; fi
    echo "samples: 1 in 0.1 s"; exit 0;;
  " - "*) echo "essays: (fake)"; exit 0;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return fake, count


@pytest.mark.parametrize("error, retried", [
    ("AssertionError: Error in memory profiling. Initial free memory 25.62 GiB, current free "
     "memory 41.78 GiB.", True),
    ("ValueError: No available memory for the cache blocks.", True),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", False),
])
def test_device_script_retries_a_config_once_when_a_shared_gpu_broke_its_start(
        tmp_path, error, retried):
    """accuracy_vllm.sh runs a config once more when its engine start failed because another
    process changed the GPU's memory (runs sharing a GPU), and only then; the exit status
    says whether every config finished."""
    script = REPO / "benchmarks" / "device" / "accuracy_vllm.sh"
    fake, count = _fake_python(tmp_path, error)
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), ACC_DRY="1",
               PY=str(fake), MODEL=str(tmp_path / "model"), RETRY_WAIT_S="0", TAG="t")
    r = subprocess.run(["bash", str(script), "default"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "accuracy_summary_t.txt").read_text()
    assert int(count.read_text()) == (2 if retried else 1), summary
    assert ("retrying once" in summary) is retried
    assert r.returncode == (0 if retried else 1), r.stdout + r.stderr
    if retried:
        assert (tmp_path / "work" / "logs" / "default.attempt1.log").is_file()
    else:
        assert "1 config(s) did not finish" in summary

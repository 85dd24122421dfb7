"""The prefill-selection study (benchmarks/accuracy/prefill_selection_study.py) on the CPU.

Its true block attention must match a brute-force softmax; a list that keeps every causal block
must score recall 1 and density 1; the scores of a sparse list must be what the list and the
true attention say; the study must run end to end on a tiny model.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ACC = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"
sys.path.insert(0, str(ACC))
import prefill_selection_study as PS  # noqa: E402


def _brute_block_mass(q, k, scale, block, start):
    hq, m, d = q.shape
    g = hq // k.shape[0]
    kk = k.float().repeat_interleave(g, 0)
    end = start + m
    out = torch.zeros(hq, -(-m // block), -(-end // block))
    for r in range(m):
        pos = start + r
        p = torch.softmax(torch.einsum("hd,hld->hl", q[:, r].float(), kk[:, :pos + 1]) * scale,
                          -1)
        for j in range(pos + 1):
            out[:, r // block, j // block] += p[:, j]
    counts = torch.tensor([min(block, m - i * block) for i in range(out.shape[1])])
    return out / counts[None, :, None]


@pytest.mark.parametrize("m,start,sub", [(200, 0, 64), (130, 64, 128), (64, 192, 512)])
def test_block_mass_matches_brute_force(m, start, sub):
    torch.manual_seed(m + start)
    hq, hkv, d, block = 4, 2, 8, 32
    q = torch.randn(hq, m, d)
    k = torch.randn(hkv, start + m, d)
    got = PS.block_mass(q, k, 0.4, block, start, sub=sub)
    want = _brute_block_mass(q, k, 0.4, block, start)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(hq, got.shape[1]), atol=1e-5)


def test_parse_variant():
    v = PS.parse_variant("xattention:xattn_threshold=0.95,xattn_stride=16")
    assert (v.cfg.prefill_method, v.cfg.xattn_threshold, v.cfg.xattn_stride) == (
        "xattention", 0.95, 16)
    assert PS.parse_variant("streaming:sink_tokens=32,local_tokens=64").cfg.local_tokens == 64
    for bad in ("xattention:nope=1", "xattention:xattn_threshold", "dense",
                "xattention:xattn_threshold=2", "bogus"):
        with pytest.raises(SystemExit):
            PS.parse_variant(bad)


def _layer_qk(n=640, hq=4, hkv=2, d=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(hq, n, d), torch.randn(hkv, n, d)


def test_full_lists_score_recall_one():
    """A variant that keeps every causal block (threshold 1, or a sequence below min_seq_len)
    has recall 1 and density 1 on every summary; chunks of 256 tokens."""
    q, k = _layer_qk()
    variants = [PS.parse_variant("xattention:xattn_threshold=1.0,min_seq_len=0"),
                PS.parse_variant("streaming:min_seq_len=100000")]
    st = PS.StudyState(variants, 1, chunk=256, page=16, needle_pos=[70, 71])
    PS.evaluate_layer(st, 0, q, k, 0.125)
    s = st.sums[:, 0]
    assert torch.allclose(s[:, :4], torch.ones(2, 4, dtype=torch.float64), atol=1e-5)
    assert s[:, 4].tolist() == [1.0, 1.0] and s[:, 5].tolist() == [1.0, 1.0]  # needle kept


def test_sparse_lists_scores():
    """Streaming (sink one block, local one block) on 640 tokens in one chunk: density and
    recall from the lists and the true attention, computed here independently."""
    q, k = _layer_qk(seed=3)
    v = PS.parse_variant("streaming:sink_tokens=64,local_tokens=64,min_seq_len=0,"
                         "prefill_dense_above=1.0")
    st = PS.StudyState([v], 1, chunk=640, page=16, needle_pos=[300])
    PS.evaluate_layer(st, 0, q, k, 0.125)
    s = st.sums[0, 0]
    mass = PS.block_mass(q, k, 0.125, 64, 0)  # [4, 10, 10]
    keep = torch.zeros(10, 10, dtype=torch.bool)  # [q block, k block]
    for i in range(10):
        keep[i, 0] = True
        keep[i, max(0, i - 1):i + 1] = True  # the 64 local tokens reach into the block before
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    recall = (mass * keep[None]).sum(-1)  # [4, 10]
    assert s[0] == pytest.approx(float(recall.mean()), abs=1e-5)
    assert s[1] == pytest.approx(float(recall.mean(1).min()), abs=1e-5)
    assert s[2] == pytest.approx(float(recall[:, 9].mean()), abs=1e-5)
    assert s[3] == pytest.approx(float((keep & causal).sum() / causal.sum()), abs=1e-6)
    assert s[3] < 0.5 and s[0] < 0.999
    assert s[4] == 0.0 and s[5] == 1.0  # the needle's block 4 is not kept for the last block


def test_study_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=8192,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path / "m")
    out = tmp_path / "study.json"
    PS.main(["--model", str(tmp_path / "m"), "--tokenizer", "char", "--haystack", "builtin",
             "--tasks", "niah", "--lengths", "1024", "--samples", "2", "--chunk", "512",
             "--variants", "streaming:sink_tokens=64,local_tokens=128,min_seq_len=0",
             "xattention:xattn_threshold=1.0,min_seq_len=0", "--out", str(out),
             "--head-config-out", str(tmp_path / "heads{frac}.json"),
             "--dense-heads", "0.5", "0.25"])
    r = json.loads(out.read_text())
    cell = r["cells"]["niah@1024"]
    s, x = cell["variants"]["streaming:sink_tokens=64,local_tokens=128,min_seq_len=0"], \
        cell["variants"]["xattention:xattn_threshold=1.0,min_seq_len=0"]
    assert s["samples"] == 2 and len(s["per_layer"]["recall"]) == 2
    assert 0 < s["density"] < 0.6 and 0 < s["recall"] < 1
    assert x["recall"] == pytest.approx(1.0, abs=1e-4) and x["density"] == pytest.approx(1.0)
    assert x["needle_kept_last_block"] == 1.0  # the needle was found in the prompt
    assert set(cell["by_depth"]) <= {"0", "0.25", "0.5", "0.75", "1"}
    # per (layer, KV head) recall and density; the head_config of the first variant's worst half
    per = cell["per_kv_head"]["streaming:sink_tokens=64,local_tokens=128,min_seq_len=0"]
    assert len(per["recall"]) == 2 and len(per["recall"][0]) == 2
    assert sum(map(sum, per["density"])) / 4 == pytest.approx(s["density"], abs=1e-6)
    assert sum(map(sum, per["recall"])) / 4 == pytest.approx(s["recall"], abs=1e-6)
    from sparse_kernels.config import load_head_config

    overrides = load_head_config(str(tmp_path / "heads0.5.json"))
    assert len(overrides) == 2 and {o.prefill_method for o in overrides} == {"dense"}
    assert len(load_head_config(str(tmp_path / "heads0.25.json"))) == 1
    half, quarter = r["head_configs"]
    assert half["dense_pairs"] == 2 and quarter["dense_pairs"] == 1
    assert half["density_after"] > quarter["density_after"] > half["density_before"]


def test_dense_head_config_picks_the_lowest_recall_pairs(tmp_path):
    recall = torch.tensor([[0.9, 0.5], [0.99, 0.7]], dtype=torch.float64)
    density = torch.tensor([[0.3, 0.2], [0.4, 0.5]], dtype=torch.float64)
    doc, info = PS.dense_head_config(recall, density, 0.5)
    assert doc == {"overrides": [
        {"layers": [0], "heads": [1], "prefill_method": "dense"},
        {"layers": [1], "heads": [1], "prefill_method": "dense"}]}
    assert info["dense"] == [[0, 1], [1, 1]]
    assert info["density_before"] == pytest.approx(0.35)
    assert info["density_after"] == pytest.approx((0.3 + 1 + 0.4 + 1) / 4)
    assert info["recall_after"] == pytest.approx((0.9 + 1 + 0.99 + 1) / 4)
    # the file is a valid head_config: the engine applies it per KV head
    from sparse_kernels.config import SparseConfig, load_head_config

    path = tmp_path / "h.json"
    path.write_text(json.dumps(doc))
    cfg = SparseConfig(prefill_method="xattention", head_overrides=load_head_config(str(path)))
    assert cfg.methods_for(0)[0] == {None: "xattention", 1: "dense"}
    assert PS.dense_head_config(recall, density, 0.0)[0] == {"overrides": []}


def test_several_fractions_need_a_file_name_per_fraction(tmp_path):
    with pytest.raises(SystemExit, match="need '{frac}'"):
        PS.main(["--model", str(tmp_path / "no-model"), "--variants", "xattention",
                 "--head-config-out", str(tmp_path / "h.json"), "--dense-heads", "0.1", "0.2"])


def test_unknown_head_config_variant_stops_before_any_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="is not one of --variants"):
        PS.main(["--model", str(tmp_path / "no-model"), "--variants", "xattention",
                 "--head-config-out", str(tmp_path / "h.json"),
                 "--head-config-variant", "streaming"])

"""The decode-selection study (benchmarks/accuracy/decode_selection_study.py) on the CPU.

Its "sum" scheme must select what the kernels' reference selects; the oracle must keep at
least as much attention as any scheme; its batched decode must reproduce the model's own
greedy generation on the dense row and on a row whose budget covers the context.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ACC = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"
sys.path.insert(0, str(ACC))
import selection_schemes as S  # noqa: E402

from sparse_kernels.reference_decode import ref_page_summaries, ref_select_pages  # noqa: E402


@pytest.mark.parametrize("group,seq_len,budget", [(1, 300, 64), (4, 517, 128), (7, 1000, 256),
                                                  (4, 200, 256)])
def test_sum_scheme_matches_kernel_reference(group, seq_len, budget):
    torch.manual_seed(group * 1000 + seq_len)
    page, hkv, d, sink, local = 16, 2, 32, 1, 2
    k = torch.randn(1, hkv, seq_len, d)
    q = torch.randn(1, hkv, group, d)
    lo, hi = S.page_bounds(k, page)
    scores = S.scheme_scores("sum", q, lo, hi, None, page, 1.0)
    mask = S.select_page_mask(scores, seq_len, page, torch.tensor([budget // page]), sink, local,
                              torch.tensor([0]))
    # the same selection through the kernels' reference (a paged cache, pages in order)
    n_pages = -(-seq_len // page)
    k_cache = torch.zeros(n_pages, page, hkv, d)
    k_cache.view(-1, hkv, d)[:seq_len] = k[0].transpose(0, 1)
    bt = torch.arange(n_pages, dtype=torch.int32)[None]
    sl = torch.tensor([seq_len], dtype=torch.int32)
    summ = ref_page_summaries(k_cache, bt, sl)
    sel = ref_select_pages(q.reshape(1, hkv * group, d), summ, bt, sl, page, budget // page,
                           sink, local)
    for h in range(hkv):
        want = sorted(int(p) for p in sel[0, h] if p >= 0)
        assert mask[0, h].nonzero().flatten().tolist() == want


def test_oracle_keeps_the_most_attention():
    torch.manual_seed(0)
    b, hkv, g, n, d, page = 1, 2, 4, 800, 32, 16
    q, k = torch.randn(b, hkv, g, d), torch.randn(b, hkv, n, d) * 2
    probs = torch.softmax(torch.einsum("bhgd,bhld->bhgl", q, k) / d**0.5, -1)
    lo, hi = S.page_bounds(k, page)
    recall = {}
    for scheme in S.SCHEMES:
        sc = S.scheme_scores(scheme, q, lo, hi, probs, page, d**-0.5)
        m = S.select_page_mask(sc, n, page, torch.tensor([8]), 1, 1, torch.tensor([0]))
        assert int(m.sum(-1).max()) == 8
        recall[scheme] = float((probs * S.token_mask(m, n, page)[:, :, None]).sum(-1).mean())
    assert all(recall["oracle"] >= r - 1e-6 for r in recall.values()), recall
    assert recall["oracle"] > min(recall.values()) + 1e-3, recall  # the schemes differ here


def test_partial_last_page_and_dense_rows():
    k = torch.arange(20.0).view(1, 1, 20, 1)
    lo, hi = S.page_bounds(k, 16)
    assert lo.flatten().tolist() == [0.0, 16.0] and hi.flatten().tolist() == [15.0, 19.0]
    sc = torch.tensor([[[1.0, 5.0, 2.0, 3.0, 0.0]]]).expand(2, 1, 5)
    m = S.select_page_mask(sc, 80, 16, torch.tensor([2, 2]), 0, 1, torch.tensor([0, 80]))
    assert m[0, 0].tolist() == [False, True, False, False, True]  # local page 4 + best page 1
    assert m[1, 0].all()  # a row of at most dense_tokens tokens reads everything


def _tiny_model(tmp_path=None):
    transformers = pytest.importorskip("transformers")
    import decode_selection_study as DS

    DS.register_attention()
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=8192,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
    return DS, model


def test_batched_variants_reproduce_greedy_generation():
    DS, model = _tiny_model()
    torch.manual_seed(1)
    prompt = torch.randint(0, 256, (1, 600)).tolist()[0]
    ref_model = model
    ref_model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        ref = ref_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12,
                                 do_sample=False, attention_mask=torch.ones(1, 600, dtype=torch.long),
                                 eos_token_id=None, pad_token_id=0)[0, 600:].tolist()
    model.config._attn_implementation = DS.ATTN_NAME
    variants = [DS.parse_variant(v, 16) for v in ("dense", "sum:1024", "sum:64", "oracle:64",
                                                  "sum:64@dl2")]
    st = DS.StudyState(variants, 16, 16, 32, 2, 2, "cpu")
    rows = DS.decode_variants(model, prompt, st, 12, eos=set())
    assert rows[0] == ref  # dense row: the model's own greedy tokens
    assert rows[1] == ref  # the budget covers the context: dense
    assert rows[4] == ref  # every layer dense (2 layers, @dl2)
    sums, count = st.sums, st.count
    rec = sums[..., 0] / count
    frac = sums[..., 2] / count
    assert torch.allclose(rec[0], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(rec[1], torch.ones(2, dtype=torch.float64))
    assert (rec[2] < 0.999).all() and (frac[2] < 0.12).all()  # 64 of ~600 tokens read
    assert (rec[3] >= rec[2] - 1e-9).all()  # the oracle keeps at least what "sum" keeps


def test_study_json(tmp_path):
    DS, _ = _tiny_model(tmp_path / "m")
    out = tmp_path / "study.json"
    DS.main(["--model", str(tmp_path / "m"), "--tokenizer", "char", "--haystack", "builtin",
             "--tasks", "niah", "--lengths", "1024", "--samples", "2", "--variants",
             "sum:128", "oracle:128", "--sink-tokens", "16", "--local-tokens", "32",
             "--out", str(out)])
    r = json.loads(out.read_text())
    cell = r["cells"]["niah@1024"]["variants"]
    assert list(cell) == ["dense", "sum:128", "oracle:128"]
    assert cell["dense"]["exact_match_vs_dense"] == 1.0
    assert cell["dense"]["recall_mean"] == pytest.approx(1.0)
    assert cell["sum:128"]["samples"] == 2
    assert cell["sum:128"]["kv_fraction_read"] < 0.2
    assert len(cell["sum:128"]["recall_per_layer"]) == 2


def test_variant_options_and_per_row_sink():
    pytest.importorskip("transformers")
    import decode_selection_study as DS

    v = DS.parse_variant("sum:4096@dl2@s128", 16)
    assert (v.scheme, v.budget, v.dense_layers, v.sink_tokens) == ("sum", 4096, 2, 128)
    assert DS.parse_variant("oracle:64", 16).sink_tokens is None
    for bad in ("sum:4096@x2", "sum:4001", "nope:64", "sum:4096@s"):
        with pytest.raises(SystemExit):
            DS.parse_variant(bad, 16)
    # per-row sinks: the row with the wider sink keeps pages 0-3 whatever their scores
    sc = torch.arange(10.0).expand(2, 1, 10).contiguous()  # later pages score higher
    m = S.select_page_mask(sc, 160, 16, torch.tensor([5, 5]), torch.tensor([1, 4]), 1,
                           torch.tensor([0, 0]))
    assert m[0, 0].nonzero().flatten().tolist() == [0, 6, 7, 8, 9]
    assert m[1, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 9]

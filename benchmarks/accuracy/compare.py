"""Compare accuracy runs (run_accuracy.py JSONs) sample by sample, and summarize runs.

Token match of a run against a reference (e.g. sparse-serve at full density vs FLASH_ATTN)::

    python benchmarks/accuracy/compare.py accuracy_qwen_dense.json accuracy_qwen_full.json \\
        [--json match.json]

Samples are paired by (task, length, depth, index); only pairs where both runs stored the
generated token ids count. Per length (and over all):

* ``exact``   -- fraction of pairs whose generated token ids are identical;
* ``first8``  -- fraction whose first 8 generated ids are identical;
* ``mean_common_prefix`` -- mean number of leading ids the two agree on;
* ``score_agree`` -- fraction whose task scores are equal; ``accuracy_ref`` / ``accuracy``: the
  mean scores of the reference and the run over the paired samples (plain sample means, not the
  per-task means of ``summary.by_length``).

One-line-per-length summaries of runs (what the device script prints)::

    python benchmarks/accuracy/compare.py --summary accuracy_*.json

Where runs differ, by depth of the queried item (correct samples per task, length and depth,
one column per run; ``--task`` / ``--length`` narrow it)::

    python benchmarks/accuracy/compare.py --by-depth accuracy_qwen_dense.json accuracy_qwen_*.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

FIRST = 8


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if "samples" not in doc or "summary" not in doc:
        raise SystemExit(f"{path}: not an accuracy result (no 'samples'/'summary')")
    return doc


def _key(s: dict) -> tuple:
    d = s.get("depth")
    return (s["task"], int(s["length"]), None if d is None else round(float(d), 4), int(s["index"]))


def _prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_match(ref: dict, run: dict) -> dict:
    """Per-length and overall token-id agreement of ``run`` with ``ref`` (docs, as loaded)."""
    ref_by = {_key(s): s for s in ref["samples"]}
    groups = defaultdict(list)
    missing_ids = unpaired = 0
    for s in run["samples"]:
        r = ref_by.get(_key(s))
        if r is None:
            unpaired += 1
            continue
        if s.get("token_ids") is None or r.get("token_ids") is None:
            missing_ids += 1
            continue
        groups[int(s["length"])].append((r, s))

    def agg(pairs) -> dict:
        n = len(pairs)
        if not n:
            return {"n": 0, "exact": None, "first8": None, "mean_common_prefix": None,
                    "score_agree": None, "accuracy_ref": None, "accuracy": None}
        return {
            "n": n,
            "exact": round(sum(r["token_ids"] == s["token_ids"] for r, s in pairs) / n, 6),
            "first8": round(sum(r["token_ids"][:FIRST] == s["token_ids"][:FIRST]
                                for r, s in pairs) / n, 6),
            "mean_common_prefix": round(sum(_prefix(r["token_ids"], s["token_ids"])
                                            for r, s in pairs) / n, 3),
            "score_agree": round(sum(r["score"] == s["score"] for r, s in pairs) / n, 6),
            "accuracy_ref": round(sum(r["score"] for r, _ in pairs) / n, 6),
            "accuracy": round(sum(s["score"] for _, s in pairs) / n, 6),
        }

    by_task = defaultdict(list)
    for L, pairs in groups.items():
        for r, s in pairs:
            by_task[(s["task"], L)].append((r, s))
    return {
        "reference": ref.get("name"), "reference_method": ref.get("method"),
        "run": run.get("name"), "run_method": run.get("method"),
        "by_length": [dict(length=L, **agg(groups[L])) for L in sorted(groups)],
        "by_task_length": [dict(task=t, length=L, **agg(p)) for (t, L), p in sorted(by_task.items())],
        "overall": agg([p for L in sorted(groups) for p in groups[L]]),
        "unpaired": unpaired, "missing_token_ids": missing_ids,
    }


def _f(x, fmt="{:.3f}") -> str:
    return "  n/a" if x is None else fmt.format(x)


def match_lines(m: dict) -> list[str]:
    lines = [f"token match: {m['run_method'] or m['run']}  vs  {m['reference_method'] or m['reference']}"]
    for e in m["by_length"] + [dict(length="all", **m["overall"])]:
        lines.append(f"  length {e['length']!s:>6}: exact {_f(e['exact'])}  first{FIRST} {_f(e['first8'])}"
                     f"  common prefix {_f(e['mean_common_prefix'], '{:.1f}')}  score agree "
                     f"{_f(e['score_agree'])}  acc {_f(e['accuracy'])} vs ref {_f(e['accuracy_ref'])}"
                     f"  (n={e['n']})")
    if m["unpaired"] or m["missing_token_ids"]:
        lines.append(f"  ({m['unpaired']} samples without a partner, {m['missing_token_ids']} without token ids)")
    return lines


def summary_lines(doc: dict) -> list[str]:
    t = doc.get("timing", {})
    head = (f"{doc.get('name')}: {doc.get('method')}"
            f"{'  [PARTIAL]' if doc.get('partial') else ''}  overall {_f(doc['summary'].get('overall'))}"
            f"  (samples {t.get('samples_s')} s, engine start {t.get('engine_start_s')} s, "
            f"generate {t.get('generate_s')} s, total {t.get('total_s')} s)")
    lines = [head]
    by_len_s = t.get("by_length", {})
    for e in doc["summary"]["by_length"]:
        L = e["length"]
        tasks = ", ".join(f"{x['task']} {x['accuracy']:.2f}" for x in doc["summary"]["by_task_length"]
                          if x["length"] == L)
        lines.append(f"  {L:>6}: acc {e['accuracy']:.3f}  decode KV read {_f(e.get('decode_kv_fraction_read'))}"
                     f"  prefill density {_f(e.get('prefill_block_density'))}"
                     f"  {by_len_s.get(str(L), '?')} s  [{tasks}]")
    es = doc.get("engine_stats") or {}
    for st in es.get("by_length", []):
        counts = {k: v for k, v in st.items() if isinstance(v, int) and k != "length"}
        if counts or st.get("error"):
            lines.append(f"  engine {st['length']:>6}: " + " ".join(f"{k}={v}" for k, v in counts.items())
                         + (f" error {st['error']}" if st.get("error") else ""))
    return lines


def by_depth(docs: list[dict], tasks=None, lengths=None) -> dict:
    """{(task, length, depth): [score sum of each run]} over the samples each run has (depth
    None: tasks that place their items at random)."""
    table: dict = defaultdict(lambda: [0.0] * len(docs))
    for i, d in enumerate(docs):
        for s in d["samples"]:
            if (tasks and s["task"] not in tasks) or (lengths and s["length"] not in lengths):
                continue
            table[(s["task"], s["length"], s["depth"])][i] += float(s["score"])
    return dict(table)


def by_depth_lines(docs: list[dict], table: dict) -> list[str]:
    names = [d.get("name") or f"run{i}" for i, d in enumerate(docs)]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'task':16s} {'length':>6s} {'depth':>5s}  " + " ".join(f"{n:>{width}s}" for n in names)]
    for (task, length, depth) in sorted(table, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        row = table[(task, length, depth)]
        d = "  any" if depth is None else f"{depth:5.2f}"
        lines.append(f"{task:16s} {length:6d} {d}  " + " ".join(f"{v:>{width}.0f}" for v in row))
    return lines


def main(argv=None) -> dict | list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="REFERENCE RUN (token match), or runs with --summary")
    ap.add_argument("--summary", action="store_true", help="print each run's per-length summary")
    ap.add_argument("--json", type=Path, default=None, help="write the token match here")
    ap.add_argument("--by-depth", action="store_true",
                    help="correct samples per task, length and depth, one column per run")
    ap.add_argument("--task", nargs="+", default=None, help="--by-depth: only these tasks")
    ap.add_argument("--length", nargs="+", type=int, default=None,
                    help="--by-depth: only these lengths")
    args = ap.parse_args(argv)
    if args.by_depth:
        docs = [load(f) for f in args.files]
        table = by_depth(docs, args.task, args.length)
        print("\n".join(by_depth_lines(docs, table)))
        return table
    if args.summary:
        docs = [load(f) for f in args.files]
        for d in docs:
            print("\n".join(summary_lines(d)))
        return docs
    if len(args.files) != 2:
        ap.error("token match takes two files: REFERENCE RUN")
    m = token_match(load(args.files[0]), load(args.files[1]))
    print("\n".join(match_lines(m)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(m, indent=1) + "\n")
    return m


if __name__ == "__main__":
    main()

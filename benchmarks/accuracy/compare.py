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

Paired differences per (task, length) cell against a reference, with their uncertainty (the
samples are the same prompts in every run, so a cell's difference is a paired one)::

    python benchmarks/accuracy/compare.py --cells accuracy_qwen_dense.json accuracy_qwen_default.json

Per cell: accuracies, the difference in points, samples better / worse than the reference, a
95% interval of the mean paired difference (normal approximation) and the exact two-sided sign
test on better against worse. A run (or the reference) given as ``a.json+b.json`` joins the
samples of several files (e.g. two calls that ran different tasks).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

FIRST = 8


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if "samples" not in doc or "summary" not in doc:
        raise SystemExit(f"{path}: not an accuracy result (no 'samples'/'summary')")
    return doc


def load_joined(spec: str) -> dict:
    """A run from one file, or from several joined with ``+`` (their samples concatenated;
    name and method from the first). Two files may not hold the same sample."""
    docs = [load(p) for p in str(spec).split("+")]
    if len(docs) == 1:
        return docs[0]
    doc = dict(docs[0])
    doc["samples"] = [s for d in docs for s in d["samples"]]
    keys = [_key(s) for s in doc["samples"]]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{spec}: the joined files hold the same sample more than once")
    return doc


def only(doc: dict, tasks=None, lengths=None) -> dict:
    """The run restricted to the samples of these tasks and lengths (``None``: all)."""
    if tasks is None and lengths is None:
        return doc
    out = dict(doc)
    out["samples"] = [s for s in doc["samples"]
                      if (tasks is None or s["task"] in tasks)
                      and (lengths is None or s["length"] in lengths)]
    return out


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test (binomial, p = 1/2) of ``better`` against ``worse``."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def cell_differences(ref: dict, run: dict) -> dict:
    """Paired score differences ``run - ref`` per (task, length) cell, in points (x 100).

    Samples pair by (task, length, depth, index). Per cell: n, both accuracies, the mean
    difference, samples better / worse, a 95% normal interval of the mean difference and the
    sign test p. Also the mean over cells (each cell weighs the same, as the README's
    averages) and the worst cell."""
    pairs_all, unpaired = _paired(ref, run)
    cells = defaultdict(list)
    for r, s in pairs_all:
        cells[(s["task"], int(s["length"]))].append((float(r["score"]), float(s["score"])))
    rows = []
    for (task, length), pairs in sorted(cells.items()):
        n = len(pairs)
        d = [b - a for a, b in pairs]
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
        half = 1.96 * sd / math.sqrt(n)
        better, worse = sum(x > 0 for x in d), sum(x < 0 for x in d)
        rows.append({
            "task": task, "length": length, "n": n,
            "accuracy_ref": round(sum(a for a, _ in pairs) / n, 6),
            "accuracy": round(sum(b for _, b in pairs) / n, 6),
            "diff_points": round(100 * mean, 3), "better": better, "worse": worse,
            "ci95_points": [round(100 * (mean - half), 3), round(100 * (mean + half), 3)],
            "sign_test_p": round(sign_test_p(better, worse), 6),
        })
    worst = min(rows, key=lambda c: c["diff_points"]) if rows else None
    return {
        "reference": ref.get("name"), "run": run.get("name"), "run_method": run.get("method"),
        "cells": rows,
        "mean_diff_points": round(sum(c["diff_points"] for c in rows) / len(rows), 3) if rows else None,
        "worst": worst, "unpaired": unpaired,
    }


def cell_lines(c: dict) -> list[str]:
    lines = [f"paired differences per cell: {c['run_method'] or c['run']}  -  {c['reference']}",
             f"  {'task':16s} {'length':>6s} {'n':>4s} {'ref':>6s} {'run':>6s} {'diff':>6s}"
             f" {'better':>6s} {'worse':>5s}  {'95% interval':>15s} {'sign p':>7s}"]
    for e in c["cells"]:
        lo, hi = e["ci95_points"]
        lines.append(f"  {e['task']:16s} {e['length']:6d} {e['n']:4d} {e['accuracy_ref']:6.3f}"
                     f" {e['accuracy']:6.3f} {e['diff_points']:+6.1f} {e['better']:6d}"
                     f" {e['worse']:5d}  [{lo:+6.1f}, {hi:+6.1f}] {e['sign_test_p']:7.3f}")
    if c["cells"]:
        w = c["worst"]
        lines.append(f"  mean over cells {c['mean_diff_points']:+.1f} points; worst cell "
                     f"{w['task']} {w['length']}: {w['diff_points']:+.1f}")
    if c["unpaired"]:
        lines.append(f"  ({c['unpaired']} samples of the run have no partner in the reference)")
    return lines


def _paired(ref: dict, run: dict) -> tuple[list[tuple[dict, dict]], int]:
    """``(reference sample, run sample)`` pairs in the run's order, matched by (task, length,
    depth, index), and how many of the run's samples have no partner."""
    ref_by = {_key(s): s for s in ref["samples"]}
    pairs = [(ref_by.get(_key(s)), s) for s in run["samples"]]
    found = [(r, s) for r, s in pairs if r is not None]
    return found, len(pairs) - len(found)


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
    pairs_all, unpaired = _paired(ref, run)
    groups = defaultdict(list)
    missing_ids = 0
    for r, s in pairs_all:
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
        if st.get("decode_selection_reuse_fraction") is not None:
            counts["selection_reuse"] = f"{st['decode_selection_reuse_fraction']:.3f}"
        if counts or st.get("error"):
            lines.append(f"  engine {st['length']:>6}: " + " ".join(f"{k}={v}" for k, v in counts.items())
                         + (f" error {st['error']}" if st.get("error") else ""))
    return lines


def by_depth(docs: list[dict], tasks=None, lengths=None) -> dict:
    """{(task, length, depth): [score sum of each run]} over the samples each run has (depth
    None: tasks that place their items at random; None in a run's slot: that run has no sample
    of the cell, as opposed to a sum of 0)."""
    table: dict = defaultdict(lambda: [None] * len(docs))
    for i, d in enumerate(docs):
        for s in d["samples"]:
            if (tasks and s["task"] not in tasks) or (lengths and s["length"] not in lengths):
                continue
            row = table[(s["task"], s["length"], s["depth"])]
            row[i] = (row[i] or 0.0) + float(s["score"])
    return dict(table)


def by_depth_lines(docs: list[dict], table: dict) -> list[str]:
    names = [d.get("name") or f"run{i}" for i, d in enumerate(docs)]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'task':16s} {'length':>6s} {'depth':>5s}  " + " ".join(f"{n:>{width}s}" for n in names)]
    for (task, length, depth) in sorted(table, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        row = table[(task, length, depth)]
        d = "  any" if depth is None else f"{depth:5.2f}"
        lines.append(f"{task:16s} {length:6d} {d}  " + " ".join(
            f"{'-':>{width}s}" if v is None else f"{v:>{width}.0f}" for v in row))
    return lines


def main(argv=None) -> dict | list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="REFERENCE RUN (token match), or runs with --summary")
    ap.add_argument("--summary", action="store_true", help="print each run's per-length summary")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the token match (or --cells' differences) here")
    ap.add_argument("--by-depth", action="store_true",
                    help="correct samples per task, length and depth, one column per run")
    ap.add_argument("--cells", action="store_true",
                    help="paired differences per (task, length) cell: REFERENCE RUN [RUN ...]")
    ap.add_argument("--task", nargs="+", default=None,
                    help="--by-depth, --cells: only these tasks")
    ap.add_argument("--length", nargs="+", type=int, default=None,
                    help="--by-depth, --cells: only these lengths")
    args = ap.parse_args(argv)
    if args.cells:
        if len(args.files) < 2:
            ap.error("--cells takes REFERENCE RUN [RUN ...]")
        ref = only(load_joined(args.files[0]), args.task, args.length)
        out = [cell_differences(ref, only(load_joined(f), args.task, args.length))
               for f in args.files[1:]]
        for c in out:
            print("\n".join(cell_lines(c)))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        return out
    if args.by_depth:
        docs = [load_joined(f) for f in args.files]
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
    m = token_match(load_joined(args.files[0]), load_joined(args.files[1]))
    print("\n".join(match_lines(m)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(m, indent=1) + "\n")
    return m


if __name__ == "__main__":
    main()

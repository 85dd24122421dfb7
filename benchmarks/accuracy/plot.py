"""PNG plots from accuracy JSONs (run_accuracy.py) with matplotlib.

    python benchmarks/accuracy/plot.py benchmarks/results/accuracy_*.json --out-dir benchmarks/results/plots

Writes, for the runs given (one run = one JSON = one method; runs with the same ``method``
label are averaged per length):

* ``accuracy_vs_length.png``      -- mean task accuracy per length, one line per method;
* ``accuracy_vs_length_<task>.png`` with ``--per-task``;
* ``accuracy_vs_decode_kv.png``   -- accuracy vs ``decode_kv_fraction_read`` (KV pages read in
  decode / pages held), one point per (run, length) where the value is known;
* ``accuracy_vs_prefill_density.png`` -- accuracy vs ``prefill_block_density`` (blocks
  computed in prefill / causal blocks), same rule.

A fraction is taken from ``summary.by_length[i]`` when set there (``run_accuracy.py
--engine-stats`` measures it per length), else from the run's top-level field; runs where both
are null are left out of that plot (dense runs can be given 1.0).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

FRACTIONS = {
    "decode_kv_fraction_read": ("accuracy_vs_decode_kv.png", "fraction of KV pages read in decode"),
    "prefill_block_density": ("accuracy_vs_prefill_density.png", "fraction of blocks computed in prefill"),
}


def load_runs(paths, labels: dict[str, str] | None = None) -> list[dict]:
    """The runs; ``labels`` ({file path or name: label}) replaces a run's ``method`` label,
    e.g. to give two runs over different task sets one label (they are then averaged per
    length). A path wins over a name; a name labels every result file of that name."""
    labels = labels or {}
    used = set()
    runs = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        if "summary" not in doc:
            raise SystemExit(f"{p}: not an accuracy result (no 'summary')")
        doc.setdefault("method", doc.get("name", Path(p).stem))
        key = next((k for k in (str(p), Path(p).name) if k in labels), None)
        if key is not None:
            doc["method"] = labels[key]
            used.add(key)
        runs.append(doc)
    if set(labels) - used:
        raise SystemExit("--label names files that are not among the results: "
                         f"{sorted(set(labels) - used)}")
    return runs


def length_curves(runs, task: str | None = None) -> dict:
    """{method: [(length, accuracy), ...]} averaged over runs with the same method."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if task is None:
            for e in r["summary"]["by_length"]:
                acc[r["method"]][e["length"]].append(e["accuracy"])
        else:
            for e in r["summary"]["by_task_length"]:
                if e["task"] == task:
                    acc[r["method"]][e["length"]].append(e["accuracy"])
    return {m: sorted((L, sum(v) / len(v)) for L, v in by_len.items()) for m, by_len in acc.items()}


def fraction_points(runs, key: str) -> dict:
    """{method: [(fraction, accuracy, length), ...]} where the fraction is known; runs with the
    same method are averaged per length (fraction and accuracy), as in :func:`length_curves`."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for e in r["summary"]["by_length"]:
            f = e.get(key)
            if f is None:
                f = r.get(key)
            if f is not None:
                acc[r["method"]][e["length"]].append((float(f), e["accuracy"]))
    return {m: sorted((sum(f for f, _ in v) / len(v), sum(a for _, a in v) / len(v), L)
                      for L, v in by_len.items())
            for m, by_len in acc.items()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(runs) -> str:
    models = sorted({Path(r.get("model", "?")).name for r in runs})
    return ", ".join(models)


def plot_lengths(runs, out: Path, task: str | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(length_curves(runs, task).items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log", base=2)
    lengths = sorted({L for r in runs for L in r["config"]["lengths"]})
    ax.set_xticks(lengths)
    ax.set_xticklabels([_len_label(L) for L in lengths])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("accuracy" + (f" ({task})" if task else " (mean over tasks)"))
    return _finish(plt, fig, ax, runs, out)


def _len_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _finish(plt, fig, ax, runs, out: Path) -> Path:
    """Title, grid, legend, save and close: the common end of every plot."""
    ax.set_title(_title(runs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_fraction(runs, key: str, out: Path) -> Path | None:
    pts = fraction_points(runs, key)
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, p in sorted(pts.items()):
        xs, ys, ls = zip(*p)
        ax.plot(xs, ys, marker="o", linestyle="", label=method)
        for x, y, L in p:
            ax.annotate(_len_label(L), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(FRACTIONS[key][1])
    ax.set_ylabel("accuracy (mean over tasks)")
    return _finish(plt, fig, ax, runs, out)


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="accuracy_*.json files")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/plots"))
    ap.add_argument("--per-task", action="store_true")
    ap.add_argument("--label", action="append", default=[], metavar="FILE=LABEL",
                    help="legend label for a result file (its name or path); repeatable")
    args = ap.parse_args(argv)
    labels = {}
    for item in args.label:
        name, sep, label = item.partition("=")
        if not sep or not label:
            raise SystemExit(f"--label {item!r}: expected FILE=LABEL")
        labels[name] = label
    runs = load_runs(args.results, labels)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_lengths(runs, args.out_dir / "accuracy_vs_length.png")]
    if args.per_task:
        for task in sorted({e["task"] for r in runs for e in r["summary"]["by_task_length"]}):
            written.append(plot_lengths(runs, args.out_dir / f"accuracy_vs_length_{task}.png", task))
    for key, (fname, _) in FRACTIONS.items():
        p = plot_fraction(runs, key, args.out_dir / fname)
        if p is None:
            print(f"no {key} values in these runs: {fname} not written")
        else:
            written.append(p)
    for p in written:
        print(f"wrote {p}")
    return written


if __name__ == "__main__":
    main()

"""Summarize torch-profiler traces of vLLM decode steps: GPU time per kernel group and name.

``bench_vllm_e2e.py --decode-batch B --profile-dir DIR`` has the engine's worker write a Chrome
trace (``*.pt.trace.json[.gz]``) of a few decode steps of the batch. This prints, per trace,
the GPU time of each kernel group (our decode attention, selection, KV write; FA3; vLLM's KV
write; GEMMs; the rest) and of the top kernels by name, per step (``--steps``), and the GPU's
busy time (the union of kernel intervals over every stream) against the traced span. Two
traces side by side (FLASH_ATTN, CUSTOM) show where a step's time differs.

    python3 benchmarks/profile_summary.py DIR_FLASH DIR_CUSTOM --steps 15 --out prof.json

Not a test: never collected by pytest, never run in CI.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

# First match wins.
GROUPS = [
    ("sparse decode attention", r"_sparse_decode_kernel|_merge_splits_kernel"
     r"|_balanced_decode_kernel|_merge_segments_kernel"),
    ("sparse selection", r"_select_fused_kernel|_topk_"),
    ("sparse KV write + summaries", r"_write_kv_kernel"),
    ("sparse summaries (prefill)", r"_update_summaries_kernel|_build_summaries_kernel"),
    ("FA3 (flash attention)", r"flash_fwd|flash::|FlashAttn|prepare_varlen"),
    ("vLLM KV write", r"reshape_and_cache"),
    ("GEMM", r"gemm|Gemm|nvjet|cutlass|xmma|cublas|matmul"),
    ("all-reduce", r"allreduce|all_reduce|AllReduce|nccl"),
]


def load_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def find_traces(arg: str) -> list[Path]:
    p = Path(arg)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.name.endswith((".json", ".json.gz"))
                      and "trace" in q.name)
    return [p] if p.is_file() else []


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def gpu_events(trace: dict, cats=("kernel", "gpu_memcpy", "gpu_memset")) -> list[dict]:
    """The trace's complete GPU events of the given categories (kernels, copies, sets)."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    return [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).lower() in cats]


def summarize(trace: dict, steps: int, top: int = 25) -> dict:
    kernels = gpu_events(trace)
    if not kernels:
        return {"kernels": 0}
    by_group: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        name, dur = e.get("name", "?"), float(e.get("dur", 0.0))
        g = by_group.setdefault(group_of(name), [0.0, 0])
        g[0] += dur
        g[1] += 1
        n = by_name.setdefault(name, [0.0, 0])
        n[0] += dur
        n[1] += 1
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in kernels]
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    streams = sorted({e.get("args", {}).get("stream") for e in kernels}, key=str)
    per = max(1, steps)
    return {
        "kernels": len(kernels),
        "streams": streams,
        "span_us_per_step": (end - start) / per,
        "busy_us_per_step": busy_us(spans) / per,
        "kernel_sum_us_per_step": sum(v[0] for v in by_group.values()) / per,
        "groups": {g: {"us_per_step": v[0] / per, "launches_per_step": v[1] / per}
                   for g, v in sorted(by_group.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": n[:120], "us_per_step": v[0] / per,
                         "launches_per_step": v[1] / per, "group": group_of(n)}
                        for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def steady_steps(trace: dict, marker: str, skip: int = 2, top: int = 25) -> dict:
    """Per-step figures from the steps between consecutive kernels matching ``marker`` (e.g.
    the sampler's, once per step), the first ``skip`` and the last one left out (the
    profile's first steps recompute the prompt's last block, eagerly): the median step's
    span and busy time, and each kernel's median time per step and per launch, by name and
    stream kind (``main``: the stream with the most kernels; ``branch``: any other, e.g. a
    CUDA graph's parallel branches)."""
    import statistics

    ks = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e.get("name", "?"),
                 e.get("args", {}).get("stream")) for e in gpu_events(trace, ("kernel",)))
    marks = [k[0] for k in ks if re.search(marker, k[2])]
    bounds = list(zip(marks, marks[1:]))[skip:-1]
    if not bounds:
        return {"steps": 0}
    counts: dict = {}
    for k in ks:
        counts[k[3]] = counts.get(k[3], 0) + 1
    main_stream = max(counts, key=counts.get)
    spans, busies, per = [], [], {}
    for a, b in bounds:
        step = [k for k in ks if a < k[0] <= b]
        spans.append(max(k[1] for k in step) - min(k[0] for k in step))
        busies.append(busy_us([(k[0], k[1]) for k in step]))
        seen: dict = {}
        for k in step:
            key = (k[2], "main" if k[3] == main_stream else "branch")
            seen.setdefault(key, []).append(k[1] - k[0])
        for key, durs in seen.items():
            per.setdefault(key, []).append(durs)
    rows = []
    for (name, kind), steps in per.items():
        rows.append({"name": name[:120], "stream": kind, "group": group_of(name),
                     "us_per_step": statistics.median(sum(d) for d in steps),
                     "launches_per_step": statistics.median(len(d) for d in steps),
                     "median_us_per_launch": statistics.median(x for d in steps for x in d)})
    rows.sort(key=lambda r: -r["us_per_step"])
    groups: dict = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["us_per_step"]
    return {"steps": len(bounds), "span_us": statistics.median(spans),
            "busy_us": statistics.median(busies), "groups_us": groups, "kernels": rows[:top]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="trace files or folders holding them")
    p.add_argument("--steps", type=int, default=1,
                   help="steps in each trace (per-step figures are totals / steps)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--step-marker", default=r"_gumbel_sample",
                   help="regex of a kernel that runs once per step (per-step medians)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {}
    for arg in args.paths:
        for path in find_traces(arg):
            trace = load_trace(path)
            s = summarize(trace, args.steps, args.top)
            s["steady"] = steady_steps(trace, args.step_marker, top=args.top)
            result[str(path)] = s
            print(f"== {path}: {s.get('kernels', 0)} kernels")
            if not s.get("kernels"):
                continue
            print(f"   span {s['span_us_per_step']:.1f} us/step, GPU busy "
                  f"{s['busy_us_per_step']:.1f}, kernel sum {s['kernel_sum_us_per_step']:.1f}"
                  f" ({len(s['streams'])} streams)")
            for g, v in s["groups"].items():
                print(f"   {g:32s} {v['us_per_step']:9.1f} us/step  "
                      f"{v['launches_per_step']:7.1f} launches/step")
            for k in s["top_kernels"][:10]:
                print(f"     {k['us_per_step']:9.1f} us  x{k['launches_per_step']:<6.1f} {k['name']}")
            st = s["steady"]
            if st.get("steps"):
                print(f"   steady steps ({st['steps']}, medians): span {st['span_us']:.1f} us, "
                      f"busy {st['busy_us']:.1f}")
                for k in st["kernels"][:12]:
                    print(f"     {k['us_per_step']:9.1f} us  x{k['launches_per_step']:<5} "
                          f"{k['median_us_per_launch']:7.2f} us each  {k['stream']:6s} "
                          f"{k['name'][:70]}")
    if not result:
        print("no traces found", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "steps": args.steps, "traces": result},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

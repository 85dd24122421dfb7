"""GPU sweep of ``last_q_scores`` launch settings (the vertical-slash and FlexPrefill estimators'
first step) on ``bench_prefill.py``'s inputs (a 16K-token chunk after a prefix).

    python benchmarks/bench_last_q.py --prefix 32768 114688 --last-q 64 \\
        --configs 1:64:4 2:64:4 4:64:8 --baseline /path/to/older/last_q_scores.py \\
        --out last_q.json

A config is ``heads_per_program:block_n:num_warps[:tiles[:num_stages]]``. Prints and writes the
median time of one call (both passes and the torch ops between them) per config, and checks
that every config's scores equal the first config's. ``--baseline`` times another version of
the module (e.g. ``git show REV:kernels/last_q_scores.py``) at its own defaults in the same
process, against the same inputs. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from bench_prefill import HEAD_DIM, bench, chunk_inputs, kernel_breakdown
from gpu_bench import write_result
from sparse_kernels.last_q_scores import last_q_launch, last_q_scores

DEFAULT_CONFIGS = ["1:64:4", "1:32:4", "1:128:4", "1:128:8", "2:64:4", "2:64:8", "4:64:8",
                   "4:32:8", "4:64:4", "2:128:8", "1:64:4:1:2", "4:64:8:1:2", "2:32:4"]


def parse_config(text: str) -> dict:
    parts = [int(x) for x in text.split(":")]
    if not 3 <= len(parts) <= 5:
        raise SystemExit(f"config {text!r}: heads_per_program:block_n:num_warps[:tiles[:stages]]")
    parts += [1, 1][len(parts) - 3:]
    return dict(zip(("heads_per_program", "block_n", "num_warps", "tiles", "num_stages"), parts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 114688])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--last-q", type=int, nargs="+", default=[64])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--baseline", default=None, help="path of another last_q_scores.py to time")
    ap.add_argument("--profile-best", action="store_true",
                    help="torch-profiler kernel breakdown of the fastest config and the default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_last_q.py needs a CUDA GPU")
    configs = [parse_config(c) for c in args.configs]
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("last_q_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    dev = torch.device("cuda")
    rows = []
    for prefix in args.prefix:
        L = prefix + args.chunk
        q, k_cache, _v, bt, _qsl, seq_lens, meta = chunk_inputs(prefix, args.chunk,
                                                                args.block_size, 0, dev)
        scale = HEAD_DIM ** -0.5
        group = q.shape[1] // k_cache.shape[2]
        for last_q in args.last_q:
            ref = None
            default_launch = last_q_launch(last_q, group)
            todo = [("default", {})] + [(":".join(str(v) for v in c.values()), c)
                                         for c in configs]
            if baseline is not None:
                todo.append(("baseline", None))
            fns = {}
            for name, cfg in todo:
                if cfg is None:
                    fn = lambda: baseline.last_q_scores(q, k_cache, bt, meta,  # noqa: E731
                                                        last_q=last_q, scale=scale)
                else:
                    fn = lambda cfg=cfg: last_q_scores(q, k_cache, bt, meta,  # noqa: E731
                                                       last_q=last_q, scale=scale, **cfg)
                v, s = fn()
                if ref is None:
                    ref = (v, s)
                diff = max((v - ref[0]).abs().max().item(), (s - ref[1]).abs().max().item())
                ms = bench(fn, 25, 100)  # bench_prefill.py's timing: do_bench median
                fns[name] = (fn, ms)
                rows.append({"prefix": prefix, "seq_len": L, "last_q": last_q, "config": name,
                             "settings": cfg, "default_launch": list(default_launch),
                             "ms": ms, "max_abs_diff_vs_default": diff})
                print(f"prefix {prefix} last_q {last_q} {name:>12}: {ms:.3f} ms  "
                      f"(max |diff| vs default {diff:.2e})", flush=True)
            if args.profile_best:
                best = min((n for n in fns if n != "baseline"), key=lambda n: fns[n][1])
                for name in dict.fromkeys(["default", best, "baseline"]):
                    if name in fns:
                        kernels, totals = kernel_breakdown(fns[name][0])
                        rows.append({"prefix": prefix, "last_q": last_q, "config": name,
                                     "profile": kernels, "profile_totals": totals})
                        print(f"  profile {name}: {totals} {kernels[:4]}", flush=True)
    write_result(args.out, chunk=args.chunk, rows=rows)


if __name__ == "__main__":
    main()

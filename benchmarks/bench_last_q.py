"""GPU sweep of ``last_q_scores`` (the vertical-slash and FlexPrefill estimators' first step):
key tiles per program, on ``bench_prefill.py``'s inputs (a 16K-token chunk after a prefix).

    python benchmarks/bench_last_q.py --prefix 114688 --tiles 1 2 4 8 16 --out last_q.json

Prints and writes the median time of one call per setting and checks that every setting's
scores equal those of one tile per program. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch
import triton

from bench_prefill import HEAD_DIM, bench, make_inputs
from gpu_bench import vllm_version
from sparse_kernels.block_sparse_prefill import prefill_block_metadata
from sparse_kernels.last_q_scores import DEFAULT_NUM_STAGES, DEFAULT_TILES, last_q_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 114688])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--last-q", type=int, default=64)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3],
                    help="launch num_stages per setting")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_last_q.py needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for prefix in args.prefix:
        L = prefix + args.chunk
        q, k_cache, _v, bt, qsl, seq_lens = make_inputs(prefix, args.chunk, 0, dev)
        meta = prefill_block_metadata(qsl, seq_lens, args.block_size, num_tokens=args.chunk,
                                      max_seq_len=L)
        scale = HEAD_DIM ** -0.5
        ref = last_q_scores(q, k_cache, bt, meta, last_q=args.last_q, scale=scale, tiles=1,
                            num_stages=1)
        for t, st in [(t, st) for st in args.stages for t in args.tiles]:
            fn = lambda t=t, st=st: last_q_scores(q, k_cache, bt, meta,  # noqa: E731
                                                  last_q=args.last_q, scale=scale, tiles=t,
                                                  num_stages=st)
            v, s = fn()
            diff = max((v - ref[0]).abs().max().item(), (s - ref[1]).abs().max().item())
            ms = bench(fn, 25, 100)  # bench_prefill.py's timing: do_bench median
            default = (t, st) == (DEFAULT_TILES, DEFAULT_NUM_STAGES)
            rows.append({"prefix": prefix, "seq_len": L, "tiles": t, "num_stages": st, "ms": ms,
                         "default": default, "max_abs_diff_vs_one_tile": diff})
            print(f"prefix {prefix} tiles {t:>2} stages {st}: {ms:.3f} ms  (max |diff| vs 1 "
                  f"tile {diff:.2e}){'  <- default' if default else ''}", flush=True)
    doc = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "vllm": vllm_version()},
           "last_q": args.last_q, "chunk": args.chunk, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()

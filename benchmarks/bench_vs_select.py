"""GPU sweep of the vertical-slash selection (``vs_select_blocks``: a radix select over many
programs, then block maps) on ``bench_prefill.py``'s inputs, against the torch path it replaced.

    python benchmarks/bench_vs_select.py --prefix 32768 114688 --configs 4096:8 2048:11 \\
        --out vs_select.json

A config is ``chunk:digit_bits``. For each prefix: the scores of the last 64 queries
(``last_q_score_planes``), then per config the median time of one ``vs_select_blocks`` call and
whether its maps equal the torch reference's (``vertical_slash_indices``, a stable sort, and the
two torch conversions); the torch path (``torch.topk``, as the estimator ran before, and the two
torch conversions) is timed beside it. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse

import torch

from bench_prefill import bench, chunk_inputs, kernel_breakdown
from gpu_bench import write_result
from sparse_kernels.estimate_vertical_slash import (
    slash_index_bands,
    vertical_index_blocks,
    vertical_slash_indices,
    vs_select_blocks,
)
from sparse_kernels.last_q_scores import last_q_score_planes

DEFAULT_CONFIGS = ["2048:8", "4096:8", "8192:8", "1024:8", "2048:6", "4096:11"]


def torch_topk_maps(scores, seq_lens, n_v, n_s, bs, nkb):
    """The estimator's path before the radix select: torch.topk, then the torch conversions."""
    width = scores.shape[-1]
    valid = torch.arange(width, device=scores.device)[None, :] < seq_lens[:, None].long()
    idx = []
    for x, k in ((scores[0], n_v), (scores[1], n_s)):
        val, i = torch.topk(torch.where(valid[:, None, :], x, -1.0), min(k, width), dim=-1)
        idx.append(torch.where(val >= 0, i, -1))
    return vertical_index_blocks(idx[0], bs, nkb), slash_index_bands(idx[1], bs, nkb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 114688])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--last-q", type=int, default=64)
    ap.add_argument("--n-vertical", type=int, default=63)
    ap.add_argument("--n-slash", type=int, default=255)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--profile", action="store_true", help="kernel breakdown of each path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_vs_select.py needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for prefix in args.prefix:
        L = prefix + args.chunk
        q, k_cache, _v, bt, _qsl, seq_lens, meta = chunk_inputs(prefix, args.chunk,
                                                                args.block_size, 0, dev)
        bs, nkb = meta.block_size, meta.max_kv_blocks
        scores = last_q_score_planes(q, k_cache, bt, meta, last_q=args.last_q)
        nv, ns = args.n_vertical, args.n_slash
        v_idx, s_idx = vertical_slash_indices(scores[0], scores[1], seq_lens, nv, ns)
        want = (vertical_index_blocks(v_idx, bs, nkb), slash_index_bands(s_idx, bs, nkb))
        todo = {"torch_topk": lambda: torch_topk_maps(scores, seq_lens, nv, ns, bs, nkb)}
        for c in args.configs:
            chunk, bits = (int(x) for x in c.split(":"))
            todo[c] = (lambda chunk=chunk, bits=bits: vs_select_blocks(
                scores, seq_lens, nv, ns, bs, nkb, chunk=chunk, digit_bits=bits))
        for name, fn in todo.items():
            got = fn()
            equal = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            ms = bench(fn, 25, 100)
            row = {"prefix": prefix, "seq_len": L, "config": name, "ms": ms,
                   "maps_equal_reference": equal,
                   "kept_vertical_blocks": int(got[0].sum()), "kept_bands": int(got[1].sum())}
            if args.profile:
                row["profile"], row["profile_totals"] = kernel_breakdown(fn)
            rows.append(row)
            print(f"prefix {prefix} {name:>10}: {ms * 1000:8.1f} us  maps equal: {equal}"
                  + (f"  {row['profile_totals']}" if args.profile else ""), flush=True)
    write_result(args.out, chunk=args.chunk, last_q=args.last_q, n_vertical=args.n_vertical,
                 n_slash=args.n_slash, rows=rows)


if __name__ == "__main__":
    main()

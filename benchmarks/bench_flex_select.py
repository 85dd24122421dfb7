"""GPU sweep of FlexPrefill's vertical-slash budgets (``cover_counts``: a radix select on mass)
and top blocks (``radix_select_cut`` with a k per row, ``radix_keep_mask``) on
``bench_prefill.py``'s inputs, against the torch path they replaced (sort + cumulative sum,
argsort ranks).

    python benchmarks/bench_flex_select.py --prefix 32768 114688 --gamma 0.9 \\
        --configs 2048:4 1024:4 2048:5 --out flex_select.json

For each prefix: the last block's scores (``last_q_score_planes``, 64 queries), then the median
time of the budgets alone per ``chunk:digit_bits`` config, of the whole selection (budgets + top blocks), and of
the torch path; whether budgets and masks equal the torch path's. Not a test: never collected
by pytest.
"""

from __future__ import annotations

import argparse

import torch

from bench_prefill import bench, chunk_inputs, kernel_breakdown
from gpu_bench import write_result
from sparse_kernels.last_q_scores import last_q_score_planes
from sparse_kernels.mass_cut import cover_counts
from sparse_kernels.radix_select import radix_keep_mask, radix_select_cut


def torch_path(planes, seq_lens, gamma, bs, nkb):
    """Session 24's estimator: sorts and cumulative sums for the budgets, argsort ranks."""
    _p, batch, hq, width = planes.shape
    sl = seq_lens.long()
    n_blocks = (sl + bs - 1) // bs
    tok_valid = (torch.arange(width, device=planes.device)[None, :] < sl[:, None])[:, None, :]
    blk_valid = (torch.arange(nkb, device=planes.device)[None, :] < n_blocks[:, None])[:, None, :]
    pooled = planes.view(2, batch, hq, nkb, bs).sum(-1)
    out, budgets = [], []
    for p in range(2):
        srt = torch.sort(torch.where(tok_valid, planes[p], 0.0), dim=-1, descending=True).values
        ntok = (torch.cumsum(srt, -1) <= gamma).sum(-1) + 1
        n = torch.minimum(torch.clamp(ntok // bs + 1, min=1), n_blocks[:, None])
        order = torch.argsort(torch.where(blk_valid, pooled[p], -1.0), dim=-1, descending=True,
                              stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(nkb, device=order.device).expand_as(order))
        out.append(((rank < n[..., None]) & blk_valid).to(torch.int8))
        budgets.append(n)
    return torch.stack(budgets), torch.stack(out)


def radix_path(planes, seq_lens, gamma, bs, nkb, chunk, digit_bits):
    _p, batch, hq, width = planes.shape
    n_blocks = ((seq_lens.long() + bs - 1) // bs).to(torch.int32)
    n_keep = cover_counts(planes.view(2, batch * hq, width), seq_lens, hq, gamma, bs,
                          chunk=chunk, digit_bits=digit_bits)
    rows = planes.view(2, batch, hq, nkb, bs).sum(-1).view(2, batch * hq, nkb)
    cut = radix_select_cut(rows, n_blocks, hq, n_keep)
    return n_keep, radix_keep_mask(rows, n_blocks, hq, cut).view(2, batch, hq, nkb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 114688])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--gamma", type=float, nargs="+", default=[0.9])
    ap.add_argument("--configs", nargs="+", default=["2048:4", "1024:4", "4096:4", "2048:5"],
                    help="chunk:digit_bits of the budgets' radix select")
    ap.add_argument("--pooled-configs", nargs="*", default=[],
                    help="rows:dot_precision launches of the pooled query-aware logits to time "
                         "(POOLED_ROWS, POOLED_DOT_PRECISION)")
    ap.add_argument("--profile", action="store_true", help="kernel breakdown of each path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_flex_select.py needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for prefix in args.prefix:
        q, k_cache, _v, bt, _qsl, seq_lens, meta = chunk_inputs(prefix, args.chunk,
                                                                args.block_size, 0, dev)
        bs, nkb = meta.block_size, meta.max_kv_blocks
        planes = last_q_score_planes(q, k_cache, bt, meta, last_q=bs)
        hq = planes.shape[2]
        for gamma in args.gamma:
            want_n, want_mask = torch_path(planes, seq_lens, gamma, bs, nkb)
            todo = {"torch": lambda: torch_path(planes, seq_lens, gamma, bs, nkb)}
            for c in args.configs:
                chunk, bits = (int(x) for x in c.split(":"))
                todo[f"budgets_{c}"] = (lambda chunk=chunk, bits=bits: cover_counts(
                    planes.view(2, -1, planes.shape[-1]), seq_lens, hq, gamma, bs,
                    chunk=chunk, digit_bits=bits))
                todo[f"radix_{c}"] = (lambda chunk=chunk, bits=bits: radix_path(
                    planes, seq_lens, gamma, bs, nkb, chunk, bits))
            for name, fn in todo.items():
                got = fn()
                if name.startswith("budgets"):
                    n_got, mask_equal = got, None
                else:
                    n_got, mask_got = got
                    mask_equal = bool(torch.equal(mask_got, want_mask))
                n_diff = (n_got.view(-1).long() - want_n.reshape(-1).long()).abs()
                ms = bench(fn, 25, 100)
                row = {"prefix": prefix, "gamma": gamma, "config": name, "ms": ms,
                       "budgets_max_abs_diff": int(n_diff.max()),
                       "budgets_differing": int((n_diff > 0).sum()),
                       "masks_equal_torch": mask_equal,
                       "mean_budget_blocks": float(n_got.float().mean())}
                if args.profile:
                    row["profile"], row["profile_totals"] = kernel_breakdown(fn)
                rows.append(row)
                print(f"prefix {prefix} gamma {gamma} {name:>14}: {ms * 1000:8.1f} us  "
                      f"budget diff {row['budgets_max_abs_diff']} ({row['budgets_differing']})"
                      f"  masks equal: {mask_equal}", flush=True)
        if args.pooled_configs:
            rows += pooled_rows(q, k_cache, bt, meta, prefix, args.pooled_configs, args.profile)
    write_result(args.out, chunk=args.chunk, block_size=args.block_size, rows=rows)


def pooled_rows(q, k_cache, bt, meta, prefix, configs, profile):
    """Median time of ``pooled_block_logits`` per launch config; max difference to the first."""
    from sparse_kernels import estimate_flexprefill as ef

    saved = (ef.POOLED_ROWS, ef.POOLED_DOT_PRECISION)
    kbar = ef.block_mean_keys(k_cache, bt, meta)
    scale = q.shape[-1] ** -0.5
    causal = (torch.arange(meta.max_kv_blocks, device=q.device)[None, :]
              <= meta.q_block_idx[:, None]) & (meta.q_block_seq >= 0)[:, None]
    out, first = [], None
    try:
        for c in configs:
            r, prec = c.split(":")
            ef.POOLED_ROWS, ef.POOLED_DOT_PRECISION = int(r), prec
            fn = lambda: ef.pooled_block_logits(q, kbar, meta, scale)  # noqa: E731
            lg = torch.where(causal[:, None, :], fn(), 0.0)
            first = lg if first is None else first
            row = {"prefix": prefix, "config": f"pooled_{c}", "ms": bench(fn, 25, 100),
                   "max_abs_diff_to_first": float((lg - first).abs().max())}
            if profile:
                row["profile"], row["profile_totals"] = kernel_breakdown(fn)
            out.append(row)
            print(f"prefix {prefix} pooled {c:>16}: {row['ms'] * 1000:8.1f} us  "
                  f"diff {row['max_abs_diff_to_first']:.2e}", flush=True)
    finally:
        ef.POOLED_ROWS, ef.POOLED_DOT_PRECISION = saved
    return out


if __name__ == "__main__":
    main()

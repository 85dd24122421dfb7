"""Where the balanced dense-mode decode kernel's time goes, per program (GPU diagnostics).

Runs :func:`sparse_kernels.balanced_decode.balanced_decode` on one decode batch (Llama-3.1-8B
attention shapes, random bf16 K/V in pages scattered as in an engine) with its ``timing``
buffer: each program records its SM, ``%globaltimer`` at entry and exit, and ``%clock64`` at
entry, after its row search, around its inline merges and at exit. Prints and writes (JSON)
the launch's span, how the programs' starts and ends spread over it, and the medians and
tails of each program's phases, beside CUDA-event timings of the launch without timing and,
where vLLM's FA3 loads, of FA3 on the same batch.

    python3 benchmarks/trace_balanced.py --context 4096 --batch 16 --out /tmp/res/trace.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _q(xs, qs=(0.0, 0.1, 0.5, 0.9, 1.0)):
    """Quantiles of ``xs`` (nearest rank), rounded to 0.01."""
    s = sorted(xs)
    return {f"p{int(q * 100)}": round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 2)
            for q in qs}


def summarize(rec: torch.Tensor) -> dict:
    """Phases of the programs that held tiles (rows of ``rec`` with a nonzero entry time)."""
    r = rec[rec[:, 1] != 0].double().cpu()
    gt0, gt1 = r[:, 1], r[:, 2]
    ck0, ck_scan, tiles, ck_merge, ck1 = r[:, 3], r[:, 4], r[:, 5], r[:, 6], r[:, 7]
    span_ns = float(gt1.max() - gt0.min())
    # clock64 cycles per ns, from each program's own entry-to-exit pair (median)
    ghz = float(((ck1 - ck0) / (gt1 - gt0).clamp(min=1)).median())
    us = lambda cycles: (cycles / ghz / 1000.0).tolist()  # noqa: E731
    loop = ck1 - ck_scan - ck_merge
    merged = ck_merge > 0
    return {
        "programs": int(r.shape[0]),
        "sms": int(r[:, 0].unique().numel()),
        "span_us": round(span_ns / 1000.0, 2),
        "clock_ghz": round(ghz, 3),
        "start_after_first_us": _q(((gt0 - gt0.min()) / 1000.0).tolist()),
        "end_before_last_us": _q(((gt1.max() - gt1) / 1000.0).tolist()),
        "program_us": _q(((gt1 - gt0) / 1000.0).tolist()),
        "row_search_us": _q(us(ck_scan - ck0)),
        "tiles": _q(tiles.tolist()),
        "tile_loop_us": _q(us(loop)),
        "us_per_tile": _q((torch.tensor(us(loop)) / tiles).tolist()),
        "merging_programs": int(merged.sum()),
        "merge_us": _q(us(ck_merge[merged])) if bool(merged.any()) else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--table-pages", type=int, default=8192)
    p.add_argument("--full-pages", type=int, default=1024,
                   help="rows_upto of the launch (top-k's full rows: the inline merge); "
                        "0: every row (dense decode: the merge launch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("trace_balanced.py needs a CUDA GPU (the timing registers are PTX)")
    from sparse_kernels.balanced_decode import default_programs, workspace_segments
    from sparse_kernels.balanced_decode import balanced_decode
    from sparse_kernels.sparse_decode import DecodeWorkspace
    from gpu_bench import capture_graph, load_fa3, median_ms, vllm_version

    dev = torch.device("cuda")
    B, ctx, hq, hkv, d, page = (args.batch, args.context, args.num_q_heads, args.num_kv_heads,
                                args.head_dim, args.page_size)
    pages = -(-ctx // page)
    g = torch.Generator(device=dev).manual_seed(0)
    kv = torch.empty((2, B * pages + 1, page, hkv, d), dtype=torch.bfloat16, device=dev)
    kv.normal_(generator=g)
    perm = torch.randperm(B * pages, generator=g, device=dev).to(torch.int32) + 1
    bt = torch.zeros((B, max(args.table_pages, pages)), dtype=torch.int32, device=dev)
    bt[:, :pages] = perm.view(B, pages)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn((B, hq, d), dtype=torch.bfloat16, device=dev, generator=g)
    out = torch.empty_like(q)
    programs = default_programs(hkv, dev)
    ws = DecodeWorkspace(B, hq, d, 1, dev, segments=workspace_segments(B, hkv, dev))
    full = args.full_pages or None
    timing = torch.zeros((hkv * programs, 8), dtype=torch.int64, device=dev)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=dev)

    def run(t=None):
        balanced_decode(q, kv[0], kv[1], bt, seq_lens, out=out, workspace=ws, full_pages=full,
                        timing=t)

    run(), run(timing)
    torch.cuda.synchronize()
    summaries, raw = [], None
    for _ in range(args.repeats):
        timing.zero_()
        flush.zero_()
        run(timing)
        torch.cuda.synchronize()
        summaries.append(summarize(timing))
        raw = timing.cpu()
    plain_us = 1000.0 * median_ms(capture_graph(run), 30, 3, flush)
    timed_us = 1000.0 * median_ms(capture_graph(lambda: run(timing)), 30, 3, flush)
    fa3_us = None
    fa3, why = load_fa3()
    if fa3 is not None:
        qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
        ref = torch.empty_like(q)
        fa3_us = 1000.0 * median_ms(capture_graph(lambda: fa3(
            q, kv[0], kv[1], max_seqlen_q=1, cu_seqlens_q=qsl, max_seqlen_k=ctx,
            seqused_k=seq_lens, block_table=bt, causal=True, softmax_scale=d ** -0.5, out=ref,
            fa_version=3)), 30, 3, flush)
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "vllm": vllm_version(),
        "shape": {"context": ctx, "batch": B, "num_q_heads": hq, "num_kv_heads": hkv,
                  "head_dim": d, "page_size": page, "table_pages": bt.shape[1],
                  "programs_per_kv_head": programs, "full_pages": full},
        "launch_us": {"balanced": round(plain_us, 2), "balanced_with_timing": round(timed_us, 2),
                      "fa3": None if fa3_us is None else round(fa3_us, 2),
                      "fa3_unavailable": None if fa3 is not None else why},
        "repeats": summaries,
        "span_us_median": statistics.median(s["span_us"] for s in summaries),
        # the last repeat, one row per (KV head, program): SM, globaltimer entry / exit,
        # clock64 entry / after the row search, tiles, merge cycles, clock64 exit
        "last_repeat_records": raw.tolist(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "last_repeat_records"},
                     indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

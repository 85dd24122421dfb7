"""Experiment: sparse decode attention as vLLM's FlashAttention-3 over gathered page tables.

The question: can the attention half of top-k decode be FA3 itself, so that rows that read
every page cost exactly what FLASH_ATTN costs (#4's 4K-in-a-128K-engine gap) and rows that read
a selection run FA3's kernel over it?

FA3 takes one page table per sequence, shared by all KV heads, while the selection is per
(sequence, KV head). With the cache in HND order (``[num_blocks, num_kv_heads, page, 2 *
head_dim]``: K and V of one head of one page are contiguous) the cache can be viewed as
``num_blocks * num_kv_heads`` pages of one KV head each, and every (sequence, KV head) becomes
a sequence of its own: its query heads are the GQA group (``[batch * hkv, group, d]``), its
page table lists ``physical_page * hkv + head`` for the pages it reads, in ascending order with
the partly filled last page last, and its length is ``(pages - 1) * page + last page's
tokens``. One FA3 launch then serves full rows (every page) and selected rows alike.

Timed here, per layer, a CUDA graph of ``--layers`` calls (L2 flushed before each replay):

* ``fa3_nhd``      -- FA3 as FLASH_ATTN calls it, NHD cache (the baseline);
* ``fa3_hnd``      -- the same call on the HND cache (FA3 with other cache strides);
* ``fa3_ph_full``  -- FA3 per (sequence, KV head) over every page (what full rows would cost);
* ``fa3_ph_sel``   -- FA3 per (sequence, KV head) over the top-k selection (budget pages);
* ``ours_sel``     -- this project's ``sparse_decode`` over the same selection (HND cache);
* ``ours_sel_nhd`` -- the same on the NHD cache (the engine's layout today);
* ``tables``       -- building the gathered tables from the selection (``gathered_tables``,
  torch ops here; a kernel would fuse it into the top-k's output).

Checks: ``fa3_ph_full`` against ``fa3_nhd``, ``fa3_ph_sel`` against ``ours_sel``, ``ours_sel``
against ``ours_sel_nhd`` (max abs differences).

    python3 benchmarks/bench_fa3_gathered.py --contexts 4096 32768 131072 --batches 1 16 \\
        --out benchmarks/results/fa3_gathered.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import add_shape_args, capture_graph, load_fa3, median_ms, vllm_version  # noqa: E402

from sparse_kernels.config import SparseConfig  # noqa: E402
from sparse_kernels.page_summary import build_page_summaries  # noqa: E402
from sparse_kernels.page_select import DENSE_ROW, SelectWorkspace  # noqa: E402
from sparse_kernels.pipeline import decode_budget_pages, decode_select_pages  # noqa: E402
from sparse_kernels.sparse_decode import sparse_decode  # noqa: E402


def gathered_tables(selected: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    page: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page tables and lengths of the (sequence, KV head) rows over the per-head cache view.

    ``selected``: int32 ``[batch, hkv, k]`` ascending logical pages, ``-1`` padding, or a row
    ``[DENSE_ROW, -1, ...]`` for every page. Returns (int32 ``[batch * hkv, width]`` tables of
    ``physical * hkv + head``, int32 ``[batch * hkv]`` lengths). Requires every selection to
    hold its sequence's last page (the local window always does)."""
    b, hkv, k = selected.shape
    dev = selected.device
    heads = torch.arange(hkv, device=dev, dtype=torch.int64)[None, :, None]
    npages = (seq_lens.long() + page - 1) // page  # [b]
    last_fill = seq_lens.long() - (npages - 1) * page
    dense = selected[:, :, 0] == DENSE_ROW  # [b, hkv]
    # dense rows: every page in order
    cols = torch.arange(width, device=dev, dtype=torch.int64)
    full = block_table.long()[:, None, :width].expand(b, hkv, width) * hkv + heads
    full = torch.where(cols[None, None, :] < npages[:, None, None], full, 0)
    # selected rows: their pages, -1 padding -> 0 (FA3 reads only the first `len` tokens)
    sel = selected.long().clamp(min=0)
    phys = block_table.long().gather(1, sel.view(b, -1)).view(b, hkv, k) * hkv + heads
    valid = selected >= 0
    phys = torch.where(valid, phys, 0)
    nsel = valid.sum(-1)  # [b, hkv]
    table = torch.zeros((b, hkv, width), dtype=torch.int64, device=dev)
    table[..., :k] = phys
    table = torch.where(dense[..., None], full, table)
    lens = torch.where(dense, seq_lens.long()[:, None],
                       (nsel - 1) * page + last_fill[:, None])
    return table.view(b * hkv, width).to(torch.int32), lens.view(-1).to(torch.int32)


def per_head_views(kv_hnd: torch.Tensor, d: int):
    """K and V as ``[num_blocks * hkv, page, 1, d]`` views of an HND cache ``[num_blocks, hkv,
    page, 2 * d]``."""
    nb, hkv, page, _ = kv_hnd.shape
    v = kv_hnd.view(nb * hkv, page, 1, 2 * d)
    return v[..., :d], v[..., d:]


def run_config(args, ctx: int, batch: int, fa3, flush) -> dict:
    dev = flush.device
    dtype = getattr(torch, args.dtype)
    page, hq, hkv, d, L = (args.page_size, args.num_q_heads, args.num_kv_heads, args.head_dim,
                           args.layers)
    g_size = hq // hkv
    scale = 1.0 / math.sqrt(d)
    pages = -(-ctx // page)
    width = max(args.table_pages, pages)
    num_blocks = batch * pages + 1
    gen = torch.Generator(device=dev).manual_seed(0)
    kv_h = torch.randn((num_blocks, hkv, page, 2 * d), dtype=dtype, device=dev, generator=gen)
    kv_n = kv_h.permute(0, 2, 1, 3).contiguous()  # NHD, same values
    kh, vh = kv_h.permute(0, 2, 1, 3)[..., :d], kv_h.permute(0, 2, 1, 3)[..., d:]  # NHD index order
    kn, vn = kv_n[..., :d], kv_n[..., d:]
    kph, vph = per_head_views(kv_h, d)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=dev).to(torch.int32) + 1
    bt = torch.zeros((batch, width), dtype=torch.int32, device=dev)
    bt[:, :pages] = perm.view(batch, pages)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn((batch, hq, d), dtype=dtype, device=dev, generator=gen)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    qph = q.view(batch * hkv, g_size, d)
    qsl_ph = torch.arange(batch * hkv + 1, dtype=torch.int32, device=dev)

    cfg = SparseConfig(token_budget=args.budget)
    cfg.validate()
    k_sel, _, _ = decode_budget_pages(cfg, page)
    summ = torch.empty((num_blocks, 2, hkv, d), dtype=dtype, device=dev)
    build_page_summaries(kh, summ, bt[:, :pages].contiguous(), seq_lens)
    selected = torch.full((batch, hkv, k_sel), -1, dtype=torch.int32, device=dev)
    sws = SelectWorkspace(batch, hkv, width, device=dev)
    decode_select_pages(cfg, q, kh, summ, bt, seq_lens, selected, sws)
    sel_max = int(min(ctx, k_sel * page))
    tab_sel, len_sel = gathered_tables(selected, bt, seq_lens, page, width)
    full_sel = torch.full_like(selected, -1)
    full_sel[:, :, 0] = DENSE_ROW
    tab_full, len_full = gathered_tables(full_sel, bt, seq_lens, page, width)

    outs = {n: torch.empty_like(q) for n in ("fa3_nhd", "fa3_hnd", "fa3_ph_full", "fa3_ph_sel",
                                             "ours_sel", "ours_sel_nhd")}

    def fa3_call(qq, k, v, cu, max_k, used, table, out):
        fa3(qq, k, v, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=max_k, seqused_k=used,
            block_table=table, causal=True, softmax_scale=scale, out=out, fa_version=3)

    plans = {
        "fa3_nhd": lambda: fa3_call(q, kn, vn, qsl, ctx, seq_lens, bt, outs["fa3_nhd"]),
        "fa3_hnd": lambda: fa3_call(q, kh, vh, qsl, ctx, seq_lens, bt, outs["fa3_hnd"]),
        "fa3_ph_full": lambda: fa3_call(qph, kph, vph, qsl_ph, ctx, len_full, tab_full,
                                        outs["fa3_ph_full"].view(batch * hkv, g_size, d)),
        "fa3_ph_sel": lambda: fa3_call(qph, kph, vph, qsl_ph, sel_max, len_sel, tab_sel,
                                       outs["fa3_ph_sel"].view(batch * hkv, g_size, d)),
        "ours_sel": lambda: sparse_decode(q, kh, vh, bt, seq_lens, selected,
                                          out=outs["ours_sel"], scale=scale),
        "ours_sel_nhd": lambda: sparse_decode(q, kn, vn, bt, seq_lens, selected,
                                              out=outs["ours_sel_nhd"], scale=scale),
        "tables": lambda: gathered_tables(selected, bt, seq_lens, page, width),
    }
    row = {"context": ctx, "batch": batch, "budget": args.budget, "table_pages": width,
           "layers": L, "selected_pages_per_head": k_sel, "us_per_layer": {}, "max_abs_diff": {}}
    for name, fn in plans.items():
        if fa3 is None and name.startswith("fa3"):
            continue
        fn()
        torch.cuda.synchronize()
        rep = capture_graph(lambda fn=fn: [fn() for _ in range(L)])
        row["us_per_layer"][name] = 1000.0 * median_ms(rep, args.iters, 3, flush) / L
    for name, fn in plans.items():  # eager, for the checks
        if fa3 is None and name.startswith("fa3"):
            continue
        fn()
    torch.cuda.synchronize()

    def diff(a, b):
        return (outs[a].float() - outs[b].float()).abs().max().item()
    if fa3 is not None:
        row["max_abs_diff"]["fa3_ph_full_vs_fa3_nhd"] = diff("fa3_ph_full", "fa3_nhd")
        row["max_abs_diff"]["fa3_hnd_vs_fa3_nhd"] = diff("fa3_hnd", "fa3_nhd")
        row["max_abs_diff"]["fa3_ph_sel_vs_ours_sel"] = diff("fa3_ph_sel", "ours_sel")
    row["max_abs_diff"]["ours_sel_vs_ours_sel_nhd"] = diff("ours_sel", "ours_sel_nhd")
    u = row["us_per_layer"]
    if "fa3_nhd" in u:
        row["vs_fa3_nhd"] = {k: u["fa3_nhd"] / v for k, v in u.items()}
    del kv_h, kv_n
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budget", type=int, default=SparseConfig().token_budget)
    p.add_argument("--table-pages", type=int, default=8256, help="block-table width (a 128K engine)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fa3_gathered.py needs a GPU (gathered_tables is CPU-tested)")
    fa3, why = load_fa3()
    if fa3 is None:
        print(f"FA3 unavailable ({why}): only this project's kernels are timed", file=sys.stderr)
    flush = torch.empty(64 * 2**20, dtype=torch.int8, device="cuda")
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            row = run_config(args, ctx, batch, fa3, flush)
            rows.append(row)
            u = row["us_per_layer"]
            print(f"{ctx:>7} x {batch:>2}: " + "  ".join(f"{k} {v:.1f}" for k, v in u.items())
                  + "  | " + "  ".join(f"{k} {v:.3g}" for k, v in row["max_abs_diff"].items()),
                  flush=True)
    doc = {"schema": "sparse-serve/fa3-gathered/1", "command": " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "device": torch.cuda.get_device_name(), "vllm": vllm_version(),
           "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

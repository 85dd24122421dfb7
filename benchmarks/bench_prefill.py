"""GPU benchmark of sparse prefill: estimator + block-sparse attention vs dense causal FA3.

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128, bf16), paged KV cache
with 16-token pages (vLLM FlashAttention layout ``[2, num_blocks, page, H, D]``), one 16K-token
prefill chunk after 32K and after 112K tokens of prefix (chunked prefill). For each estimator a
setting that keeps ~10% of the causal blocks is found first (untimed search on the same inputs;
the actual density is reported), then estimator, sparse attention and both together are timed
(``triton.testing.do_bench`` medians, CUDA events).

Inputs are synthetic but structured (random Q/K give near-uniform attention, where no estimator
has anything to find): post-RoPE-like Q and K share a per-KV-head direction rotated by position
(RoPE frequencies, base 10000), so q.k decays with distance (locality / slash lines), and a few
"heavy" key positions (the first 4 tokens and 16 random ones) carry a direction that every query
has a component along (sink / vertical lines). Strengths vary across heads.

Dense baseline: ``vllm.vllm_flash_attn.flash_attn_varlen_func(..., fa_version=3)`` on the same
paged cache. Without vLLM the FA3 columns are null and the table compares against our kernel at
full density. The run also reports max |ours at full density - FA3|.

    python benchmarks/bench_prefill.py [--out benchmarks/results/prefill_<date>.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

import torch
import triton

from gpu_bench import load_fa3, vllm_version
from sparse_kernels.block_sparse_prefill import (
    all_causal_block_lists,
    block_sparse_prefill_attention,
    prefill_block_metadata,
)
from sparse_kernels.estimate_flexprefill import estimate_flexprefill
from sparse_kernels.estimate_streaming import estimate_streaming
from sparse_kernels.estimate_vertical_slash import estimate_vertical_slash
from sparse_kernels.estimate_xattention import estimate_xattention

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
METHODS = ("streaming", "xattention", "vertical_slash", "flexprefill")


def make_inputs(prefix: int, chunk: int, seed: int, dev):
    """Paged bf16 K/V cache (FA layout views) + q for one sequence of prefix + chunk tokens."""
    g = torch.Generator(device=dev).manual_seed(seed)
    L = prefix + chunk
    n_pages = -(-L // PAGE)
    num_blocks = n_pages + 8
    d = HEAD_DIM
    group = HQ // HKV
    pos = torch.arange(L, device=dev, dtype=torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    ang = pos[:, None] * inv_freq[None, :]  # [L, d/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [L', H, d] at positions of its last L' tokens
        n = x.shape[0]
        c, s = cos[L - n:, None, :], sin[L - n:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x1 * s + x2 * c
        return out

    u = torch.randn(HKV, d, device=dev, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    w = torch.randn(HKV, d, device=dev, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    # per-head strengths: locality alpha (logit boost ~alpha^2/sqrt(d) at distance 0), heavy beta
    alpha = torch.linspace(5.0, 9.0, HKV, device=dev)
    beta = torch.linspace(14.0, 8.0, HKV, device=dev)
    k = torch.randn(L, HKV, d, device=dev, generator=g)
    k = k + rope(alpha[None, :, None] * u[None].expand(L, HKV, d))
    heavy = torch.cat([torch.arange(4, device=dev),
                       torch.randint(4, L, (16,), device=dev, generator=g)])
    k[heavy] += beta[None, :, None] * w[None]
    v = torch.randn(L, HKV, d, device=dev, generator=g)
    q = torch.randn(chunk, HKV, group, d, device=dev, generator=g)
    q = q + rope(alpha[None, :, None] * u[None].expand(chunk, HKV, d))[:, :, None, :]
    q = q + (0.8 * beta)[None, :, None, None] * w[None, :, None, :]
    q = q.reshape(chunk, HQ, d).to(torch.bfloat16).contiguous()

    kv_cache = torch.zeros(2, num_blocks, PAGE, HKV, d, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, device=dev, generator=g)[:n_pages]
    block_table = perm.to(torch.int32)[None, :].contiguous()
    pad = n_pages * PAGE - L
    kp = torch.cat([k, k.new_zeros(pad, HKV, d)]).view(n_pages, PAGE, HKV, d)
    vp = torch.cat([v, v.new_zeros(pad, HKV, d)]).view(n_pages, PAGE, HKV, d)
    kv_cache[0, perm.long()] = kp.to(torch.bfloat16)
    kv_cache[1, perm.long()] = vp.to(torch.bfloat16)
    del k, v, kp, vp
    qsl = torch.tensor([0, chunk], device=dev, dtype=torch.int32)
    seq_lens = torch.tensor([L], device=dev, dtype=torch.int32)
    return q, kv_cache[0], kv_cache[1], block_table, qsl, seq_lens


def chunk_inputs(prefix: int, chunk: int, block_size: int, seed: int, dev):
    """:func:`make_inputs` and the chunk's block metadata: ``(q, k_cache, v_cache,
    block_table, query_start_loc, seq_lens, meta)``."""
    q, k_cache, v_cache, bt, qsl, seq_lens = make_inputs(prefix, chunk, seed, dev)
    meta = prefill_block_metadata(qsl, seq_lens, block_size, num_tokens=chunk,
                                  max_seq_len=prefix + chunk)
    return q, k_cache, v_cache, bt, qsl, seq_lens, meta


def mass_recall(q, k_cache, bt, meta, lists, L: int, scale: float, n_blocks: int = 4) -> float:
    """Attention-mass recall: for ``n_blocks`` query blocks spread over the chunk (all their
    queries, all heads), the fraction of each query's dense softmax mass that falls in the key
    blocks the lists keep (causal), averaged. 1.0 = nothing lost."""
    bs, nkb = meta.block_size, meta.max_kv_blocks
    n_pages = -(-L // PAGE)
    k = k_cache[bt[0, :n_pages].long()].reshape(n_pages * PAGE, HKV, HEAD_DIM)[:L].float()
    seq = meta.q_block_seq.cpu()
    slots = [s for s in range(meta.num_q_blocks) if int(seq[s]) >= 0]
    pick = [slots[int(i * (len(slots) - 1) / max(n_blocks - 1, 1))] for i in range(n_blocks)]
    group = HQ // HKV
    kb_of = torch.arange(L, device=q.device) // bs
    out = []
    for s in pick:
        t0, n = int(meta.q_block_tok_start[s]), int(meta.q_block_tok_len[s])
        qpos = L - q.shape[0] + t0 + torch.arange(n, device=q.device)
        qq = q[t0 : t0 + n].float().view(n, HKV, group, HEAD_DIM)
        logits = torch.einsum("nhgd,khd->hgnk", qq, k) * scale  # [Hkv, G, n, L]
        logits = logits.masked_fill(torch.arange(L, device=q.device) > qpos[:, None],
                                    float("-inf"))
        p = torch.softmax(logits, -1)
        keep = torch.zeros(HKV, nkb + 1, device=q.device, dtype=torch.bool)
        cnt = lists.block_count[s].long()
        idx = lists.block_idx[s].long()
        valid = torch.arange(idx.shape[1], device=q.device)[None, :] < cnt[:, None]
        keep.scatter_(1, torch.where(valid, idx, nkb), True)
        kept = keep[:, :nkb][:, kb_of]  # [Hkv, L]
        out.append((p * kept[:, None, None, :]).sum(-1).mean().item())
        del logits, p
    return sum(out) / len(out)


def bench(fn, warmup: int, rep: int) -> float:
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def kernel_breakdown(fn, calls: int = 5, top: int = 12) -> tuple[list[dict], dict]:
    """The GPU kernels (and copies) of ``fn``: device time per call of each, most first (the
    ``top`` largest), and the totals per call over all of them (``kernel_us``, ``launches``).
    A wall time well above ``kernel_us`` is GPU idle time between launches (host-bound)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = ev.time_range.elapsed_us()  # a kernel (or copy) on the device
        if t > 0:
            n, c = per.get(ev.name, (0.0, 0))
            per[ev.name] = (n + t, c + 1)
    rows = [{"name": k, "us_per_call": v / calls, "launches_per_call": c / calls}
            for k, (v, c) in per.items()]
    totals = {"kernel_us": sum(r["us_per_call"] for r in rows),
              "launches": sum(r["launches_per_call"] for r in rows)}
    return sorted(rows, key=lambda r: -r["us_per_call"])[:top], totals


def search_setting(method, run, target: float, iters: int = 12):
    """Find the method's knob giving density ~target (density grows with the knob)."""
    if method == "streaming":
        lo, hi, fmt = 0.0, 200_000.0, lambda x: {"sink_tokens": 128, "local_tokens": int(x)}
    elif method == "xattention":  # also xattention_s<stride>
        lo, hi, fmt = 0.01, 0.999, lambda x: {"threshold": x}
    elif method == "vertical_slash":
        # budgets scaled together from the config's 1024:4096 ratio, 1/256x .. 32x
        lo, hi, fmt = math.log(1 / 256), math.log(32.0), lambda x: {
            "n_vertical": max(1, int(1024 * math.exp(x))), "n_slash": max(1, int(4096 * math.exp(x)))}
    else:
        lo, hi, fmt = 0.01, 0.999, lambda x: {"gamma": x}
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        dens = float(run(**fmt(mid)).density)
        if best is None or abs(dens - target) < abs(best[1] - target):
            best = (fmt(mid), dens)
        if dens > target:
            hi = mid
        else:
            lo = mid
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 114688])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--target-density", type=float, default=0.10)
    ap.add_argument("--xattn-stride", type=int, nargs="+", default=[8, 16],
                    help="one xattention row per stride")
    ap.add_argument("--vs-last-q", type=int, default=64)
    ap.add_argument("--flex-tau", type=float, default=0.1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-estimators", action="store_true",
                    help="also record each estimator's GPU kernels at its setting (torch "
                         "profiler, 5 calls): row['estimator_kernels'], us per call, top 12; "
                         "row['estimator_kernel_us'] / ['estimator_launches']: all of them")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA GPU")
    dev = torch.device("cuda")
    fa3, why = load_fa3()
    if fa3 is None:
        print(f"[bench] vLLM FA3 unavailable ({why}); dense = our kernel", file=sys.stderr)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    bs = args.block_size
    rows, checks = [], []
    for prefix in args.prefix:
        chunk = args.chunk
        L = prefix + chunk
        q, k_cache, v_cache, bt, qsl, seq_lens, meta = chunk_inputs(prefix, chunk, bs, args.seed,
                                                                    dev)
        full = all_causal_block_lists(meta, HKV)
        ours_dense = lambda: block_sparse_prefill_attention(  # noqa: E731
            q, k_cache, v_cache, bt, meta, full.block_idx, full.block_count, scale=scale)
        out_ours = ours_dense()
        dense_triton_ms = bench(ours_dense, args.warmup, args.rep)
        fa3_ms, max_diff = None, None
        if fa3 is not None:
            def run_fa3():
                return fa3(q, k_cache, v_cache, max_seqlen_q=chunk, cu_seqlens_q=qsl,
                           max_seqlen_k=L, seqused_k=seq_lens, block_table=bt, causal=True,
                           softmax_scale=scale, fa_version=3)
            out_fa3 = run_fa3()
            max_diff = (out_fa3.float() - out_ours.float()).abs().max().item()
            fa3_ms = bench(run_fa3, args.warmup, args.rep)
        dense_ms = fa3_ms if fa3_ms is not None else dense_triton_ms
        checks.append({"prefix": prefix, "chunk": chunk,
                       "max_abs_diff_full_density_vs_fa3": max_diff,
                       "dense_fa3_ms": fa3_ms, "dense_triton_full_density_ms": dense_triton_ms})
        print(f"[prefix {prefix}] dense FA3 {fa3_ms} ms, ours@full {dense_triton_ms:.3f} ms, "
              f"max|diff| {max_diff}", flush=True)
        estimators = {
            "streaming": lambda **kw: estimate_streaming(meta, HKV, **kw),
            "vertical_slash": lambda **kw: estimate_vertical_slash(q, k_cache, bt, meta,
                                                                   last_q=args.vs_last_q,
                                                                   scale=scale, **kw),
            "flexprefill": lambda **kw: estimate_flexprefill(q, k_cache, bt, meta,
                                                             tau=args.flex_tau, scale=scale, **kw),
        }
        for stride in args.xattn_stride:
            estimators[f"xattention_s{stride}"] = (
                lambda stride=stride, **kw: estimate_xattention(q, k_cache, bt, meta, stride=stride,
                                                                scale=scale, **kw))
        names = []
        for m in args.methods:
            names += [f"xattention_s{st}" for st in args.xattn_stride] if m == "xattention" else [m]
        for method in names:
            est = estimators[method]
            t0 = time.time()
            knob = "xattention" if method.startswith("xattention") else method
            setting, _ = search_setting(knob, est, args.target_density)
            search_s = time.time() - t0
            lists = est(**setting)
            density = float(lists.density)
            est_fn = lambda: est(**setting)  # noqa: E731
            attn_fn = lambda: block_sparse_prefill_attention(  # noqa: E731
                q, k_cache, v_cache, bt, meta, lists.block_idx, lists.block_count, scale=scale)

            def total_fn():
                ls = est(**setting)
                return block_sparse_prefill_attention(q, k_cache, v_cache, bt, meta,
                                                      ls.block_idx, ls.block_count, scale=scale)
            out_sparse = attn_fn()
            rel_err = ((out_sparse.float() - out_ours.float()).norm()
                       / out_ours.float().norm()).item()
            recall = mass_recall(q, k_cache, bt, meta, lists, L, scale)
            est_ms = bench(est_fn, args.warmup, args.rep)
            attn_ms = bench(attn_fn, args.warmup, args.rep)
            total_ms = bench(total_fn, args.warmup, args.rep)
            row = {
                "prefix": prefix, "chunk": chunk, "seq_len": L, "method": method,
                "setting": setting, "density": density,
                "dense_ms": dense_ms, "dense_baseline": "fa3" if fa3_ms is not None else "triton",
                "dense_fa3_ms": fa3_ms, "dense_triton_ms": dense_triton_ms,
                "estimator_ms": est_ms, "sparse_attention_ms": attn_ms, "total_ms": total_ms,
                "speedup": dense_ms / total_ms, "estimator_share": est_ms / (est_ms + attn_ms),
                "attn_mass_recall": recall, "rel_l2_err_vs_dense": rel_err,
                "setting_search_s": search_s,
            }
            if args.profile_estimators:
                row["estimator_kernels"], tot = kernel_breakdown(est_fn)
                row["estimator_kernel_us"] = tot["kernel_us"]
                row["estimator_launches"] = tot["launches"]
                print(f"    {tot['launches']:.0f} launches, {tot['kernel_us']:.1f} us of kernels "
                      f"per call; " + "; ".join(f"{k['name'][:60]} {k['us_per_call']:.1f} us"
                                               for k in row["estimator_kernels"][:6]),
                      flush=True)
            rows.append(row)
            print(f"  {method:15s} density {density:.3f} recall {recall:.3f} est {est_ms:7.3f} "
                  f"attn {attn_ms:7.3f} total {total_ms:7.3f} ms  speedup {row['speedup']:.2f}x  "
                  f"(setting {setting})", flush=True)
        del q, k_cache, v_cache
        torch.cuda.empty_cache()

    date = _dt.datetime.now().strftime("%Y-%m-%d")
    doc = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "vllm": vllm_version(), "cuda": torch.version.cuda},
        "shapes": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": HEAD_DIM,
                   "dtype": "bfloat16", "page_size": PAGE, "block_size": bs,
                   "kv_layout": "FA [2, num_blocks, page, H, D]"},
        "inputs": ("synthetic structured Q/K: shared per-KV-head direction rotated by position "
                   "(RoPE frequencies, base 10000) in Q and K -> locality; 20 heavy key positions "
                   "(first 4 + 16 random) with a direction all queries share -> vertical lines; "
                   "strengths vary by head; V random"),
        "metrics": {"attn_mass_recall": "mean over 4 query blocks spread over the chunk, all "
                                        "heads and queries, of the dense softmax mass inside "
                                        "the kept key blocks",
                    "rel_l2_err_vs_dense": "||sparse - dense|| / ||dense|| of the attention "
                                           "output (V random: dense output is small, so this "
                                           "is pessimistic)"},
        "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms",
        "target_density": args.target_density,
        "estimator_params": {"xattn_stride": args.xattn_stride, "vs_last_q": args.vs_last_q,
                             "flex_tau": args.flex_tau},
        "checks": checks,
        "rows": rows,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"prefill_{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    hdr = (f"{'prefix':>7} {'method':>15} {'density':>8} {'recall':>7} {'dense ms':>9} "
           f"{'est ms':>8} {'attn ms':>8} {'total ms':>9} {'speedup':>8} {'est share':>9}")
    print(hdr)
    for r in rows:
        print(f"{r['prefix']:>7} {r['method']:>15} {r['density']:>8.3f} "
              f"{r['attn_mass_recall']:>7.3f} {r['dense_ms']:>9.3f} "
              f"{r['estimator_ms']:>8.3f} {r['sparse_attention_ms']:>8.3f} {r['total_ms']:>9.3f} "
              f"{r['speedup']:>7.2f}x {r['estimator_share']:>9.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

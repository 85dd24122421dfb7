"""Host (CPU) time of the vLLM backend's eager path per attention layer (GPU diagnostics).

vLLM runs attention eagerly for every batch that is not a pure decode batch (its piecewise CUDA
graphs leave attention out), so whatever Python a layer's KV write and forward run is paid 32
times per step of an 8B model. When the GPU work of a step is short (prefix-cache hits, short
prompts, small prefill chunks beside decodes) that host time is the step. This times the host
side of ``do_kv_cache_update`` + ``forward`` of :class:`vllm_sparse.backend.SparseAttentionImpl`
on one mixed batch (decode rows and short prefill rows over a cached prefix; Llama-3.1-8B
attention shapes), beside what FLASH_ATTN launches for the same layer (vLLM's
``reshape_and_cache_flash`` and one ``flash_attn_varlen_func``), then profiles the calls
(cProfile) and lists any host-device synchronisation (``torch.cuda.set_sync_debug_mode``).

    python3 benchmarks/bench_host_overhead.py --decodes 2 --prefills 14 --out /tmp/res/host.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import json
import math
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def host_us(fn, iters: int) -> dict:
    """Median / p90 host microseconds of ``fn()`` with the GPU idle at each call's start."""
    xs = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e6)
    xs.sort()
    return {"median": round(statistics.median(xs), 1), "p90": round(xs[int(0.9 * (len(xs) - 1))], 1)}


def gpu_us(fn, iters: int) -> float:
    """Median GPU microseconds of ``fn()`` (CUDA events; host-bound calls show their host time)."""
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return round(statistics.median(ts), 1)


def profile_top(fn, iters: int, top: int) -> list[dict]:
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(iters):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls_per_iter": nc / iters,
                     "tottime_us_per_iter": round(tt / iters * 1e6, 1),
                     "cumtime_us_per_iter": round(ct / iters * 1e6, 1)})
    rows.sort(key=lambda r: -r["tottime_us_per_iter"])
    return rows[:top]


def sync_points(fn) -> list[str]:
    """The warnings torch's sync debug mode raises during one call of ``fn`` (host syncs)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message)[:200] for w in caught
                   if not str(w.message).startswith("Synchronization debug mode is a prototype")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decodes", type=int, default=2, help="decode rows (1 token each)")
    p.add_argument("--prefills", type=int, default=14, help="prefill rows after their prefix")
    p.add_argument("--prefill-tokens", type=int, default=16, help="new tokens per prefill row")
    p.add_argument("--context", type=int, default=4096, help="every row's sequence length")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host_overhead.py needs a CUDA GPU")

    from vllm.v1.attention.backend import CommonAttentionMetadata

    from gpu_bench import vllm_version
    from sparse_kernels.config import SparseConfig
    from sparse_kernels.pipeline import decode_side_stream
    from vllm_sparse import backend

    dev = torch.device("cuda")
    hq, hkv, d, page, n_ctx = args.num_q_heads, args.num_kv_heads, args.head_dim, args.page, args.context
    nd, npf, pt = args.decodes, args.prefills, args.prefill_tokens
    reqs = nd + npf
    pages_per = -(-n_ctx // page)
    blocks = reqs * pages_per + 16
    g = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn((blocks, page, hkv, 2 * d), generator=g, device=dev, dtype=torch.bfloat16)
    kv_cache = kv.transpose(1, 2)  # logical [B, H, N, 2D] in NHD memory order, as vLLM's
    perm = torch.randperm(reqs * pages_per, generator=g, device=dev).to(torch.int32)
    table_w = -(-args.max_model_len // page)
    bt = torch.zeros((reqs, table_w), dtype=torch.int32, device=dev)
    bt[:, :pages_per] = perm.view(reqs, pages_per)
    q_lens = [1] * nd + [pt] * npf
    qsl_cpu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(qsl_cpu[-1])
    seq_cpu = torch.full((reqs,), n_ctx, dtype=torch.int32)
    slots = []
    for r in range(reqs):
        for t in range(n_ctx - q_lens[r], n_ctx):
            slots.append(int(bt[r, t // page]) * page + t % page)
    m = CommonAttentionMetadata(
        query_start_loc=qsl_cpu.to(dev), query_start_loc_cpu=qsl_cpu,
        seq_lens=seq_cpu.to(dev), num_reqs=reqs, num_actual_tokens=n,
        max_query_len=max(q_lens), max_seq_len=n_ctx, block_table_tensor=bt,
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        seq_lens_cpu_upper_bound=seq_cpu)

    cfg = backend.vllm_sparse_config()  # the defaults, or SPARSE_* from the environment
    b = backend.SparseAttentionMetadataBuilder.without_engine(  # no VllmConfig needed
        cfg, block_size=page, num_heads_q=hq, num_heads_kv=hkv, head_size=d, max_seqs=256,
        max_pages=table_w, device=dev,
        side_stream=decode_side_stream(dev) if cfg.decode_overlap else None)
    impl = backend.SparseAttentionImpl(hq, d, 1 / math.sqrt(d), hkv, None, None, "auto")
    impl.max_model_len = args.max_model_len

    class Layer:
        layer_name = "model.layers.3.self_attn.attn"
        _k_scale = _v_scale = torch.ones((), device=dev)

    layer = Layer()
    q = torch.randn((n, hq, d), generator=g, device=dev, dtype=torch.bfloat16)
    key = torch.randn((n, hkv, d), generator=g, device=dev, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    out = torch.empty_like(q)
    meta = b.build(0, m)

    def ours():
        impl.do_kv_cache_update(layer, key, value, kv_cache, m.slot_mapping)
        impl.forward(layer, q, key, value, kv_cache, meta, output=out)

    from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    k_cache, v_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    fa_ver = backend._fa_version()

    def flash():
        reshape_and_cache_flash(key, value, k_cache, v_cache, m.slot_mapping, "auto",
                                layer._k_scale, layer._v_scale)
        flash_attn_varlen_func(q=q, k=k_cache, v=v_cache, out=out,
                               cu_seqlens_q=m.query_start_loc, max_seqlen_q=m.max_query_len,
                               seqused_k=m.seq_lens, max_seqlen_k=n_ctx, softmax_scale=impl.scale,
                               causal=True, block_table=bt, fa_version=fa_ver)

    for fn in (ours, ours, flash, flash):  # JIT compiles and FA's first-call set-up
        fn()
    torch.cuda.synchronize()
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "vllm": vllm_version(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "batch": {"decodes": nd, "prefills": npf, "prefill_tokens": pt, "context": n_ctx,
                  "tokens": n},
        "config": {"decode_method": cfg.decode_method, "prefill_method": cfg.prefill_method,
                   "token_budget": cfg.token_budget},
        "build_host_us": host_us(lambda: b.build(0, m), args.iters),
        "layer_host_us": {"sparse_serve": host_us(ours, args.iters),
                          "flash_attn": host_us(flash, args.iters)},
        "layer_gpu_us": {"sparse_serve": gpu_us(ours, args.iters),
                         "flash_attn": gpu_us(flash, args.iters)},
        "sync_points": {"sparse_serve": sync_points(ours), "flash_attn": sync_points(flash)},
        "profile_sparse_serve": profile_top(ours, args.iters, args.top),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "profile_sparse_serve"}, indent=1))
    for r in result["profile_sparse_serve"]:
        print(f"{r['tottime_us_per_iter']:9.1f} {r['cumtime_us_per_iter']:9.1f} "
              f"{r['calls_per_iter']:6.1f}  {r['function']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

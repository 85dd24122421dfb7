"""What the GPU benchmarks share: vLLM's FlashAttention-3 (the dense baseline, from the vLLM
bundle) and CUDA-event timing (a function captured once as a CUDA graph and replayed, the L2
cache flushed before each timed replay, the median reported)."""

from __future__ import annotations

import torch


def vllm_version() -> str | None:
    """The installed vLLM's version for a result's JSON (None where vLLM does not import)."""
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001 - a missing or broken engine is recorded as None
        return None


def write_result(path: str | None, **fields) -> dict:
    """A result document: the command, date, device and versions, then ``fields``; written as
    JSON to ``path`` (when given) and returned."""
    import datetime
    import json
    import os
    import sys

    import triton

    doc = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "vllm": vllm_version()},
           **fields}
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


def add_shape_args(p) -> None:
    """The attention shape of the benchmarks (argparse): Llama-3.1-8B's by default (32 query
    heads, 8 KV heads, head dim 128, bf16, pages of 16 tokens), as the kernels issue names it."""
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])


def load_fa3():
    """``(flash_attn_varlen_func, None)``, or ``(None, why)`` when vLLM's FA3 cannot be imported."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - report any import failure
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_varlen_func, None


def capture_graph(fn):
    """``fn`` warmed up on a side stream, then captured; returns the graph's ``replay``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def median_ms(run, iters: int, warmup: int, flush: torch.Tensor) -> float:
    """Median milliseconds of ``run()`` over ``iters`` calls, ``flush`` zeroed before each."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    return times[len(times) // 2]

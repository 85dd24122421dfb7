"""CUDA-event timing shared by the GPU benchmarks: a function captured once as a CUDA graph and
replayed, the L2 cache flushed before each timed replay, the median reported."""

from __future__ import annotations

import torch


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

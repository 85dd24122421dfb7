"""Compile the decode and prefill kernels for an H100 (sm_90) on a machine without a GPU.

Run as a script by test_compile_sm90.py (a fresh process: the tests interpret Triton, and this
needs the compiler). Triton's driver is replaced by a stand-in that names the target, and every
kernel launch becomes a compile-only ``warmup``; the launch wrappers run as in an engine, so
the constexpr combinations they pick are the ones compiled. Prints one ``name cubin`` line per
compiled kernel; any compile error raises.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
# launches go through JITFunction.run (patched below), never a kept kernel's own launcher
os.environ["SPARSE_SERVE_FAST_LAUNCH"] = "0"

import torch  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Utils:
    def get_device_properties(self, dev):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}


class _H100:
    utils = _Utils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, dev=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, t):
        return t


driver.set_active(_H100())
_run = jit.JITFunction.run


_seen: set = set()  # the compiled kernels so far (a cache hit returns the same object)
_serving = False


def _compile_only(self, *args, grid, warmup, **kwargs):
    k = _run(self, *args, grid=grid, warmup=True, **kwargs)
    if id(k) not in _seen:
        _seen.add(id(k))
        print(self.fn.__name__, "cubin" if "cubin" in k.asm else "no-cubin", flush=True)
        if _serving:
            print("compiled-while-serving", self.fn.__name__, flush=True)
    return k


jit.JITFunction.run = _compile_only


def main() -> None:
    from sparse_kernels import page_select as ps
    from sparse_kernels.config import PREFILL_METHODS, SparseConfig
    from sparse_kernels.pipeline import (decode_budget_pages, warm_up_decode, warm_up_prefill,
                                         warm_up_summary_update)
    from sparse_kernels.balanced_decode import balanced_decode
    from sparse_kernels.decode_stats import accumulate_decode_reads
    from sparse_kernels.sparse_decode import sparse_decode

    cpu = torch.device("cpu")
    # Llama-3.1-8B decode at 128K (vLLM's padded block table) and Qwen2-0.5B at 32K, batch 16.
    for batch, hkv, group, d, max_pages, seq in ((1, 8, 4, 128, 8256, 131072),
                                                  (16, 2, 7, 64, 2064, 32768)):
        q = torch.zeros(batch, hkv * group, d, dtype=torch.bfloat16)
        kc = torch.zeros(64, 16, hkv, d, dtype=torch.bfloat16)
        summ = torch.zeros(64, 2, hkv, d, dtype=torch.bfloat16)
        bt = torch.zeros(batch, max_pages, dtype=torch.int32)
        sl = torch.full((batch,), seq, dtype=torch.int32)
        for topk_method in ("single", "two_stage"):
            ws = ps.SelectWorkspace(batch, hkv, max_pages, device=cpu, counters=False)
            ps.select_pages(q, summ, bt, sl, 16, 256, 4, 32, workspace=ws, k_cache=kc,
                            dense_pages=512, topk_method=topk_method)
            # selection reuse: rows flagged to keep an earlier step's selection
            ps.select_pages(q, summ, bt, sl, 16, 256, 4, 32, workspace=ws,
                            dense_pages=512, topk_method=topk_method,
                            out=torch.zeros(batch, hkv, 256, dtype=torch.int32),
                            keep=torch.zeros(batch, dtype=torch.int32))
        from sparse_kernels.selection_reuse import new_reuse_state, update_reuse_rows

        state, keep = new_reuse_state(512, cpu)
        update_reuse_rows(state, keep, sl, bt, batch, 16, 4,
                          counts=torch.zeros(2, dtype=torch.float64))
        sel = torch.zeros(batch, hkv, 256, dtype=torch.int32)
        sparse_decode(q, kc, kc, bt, sl, selected=sel, out=torch.zeros_like(q), num_splits=4)
        balanced_decode(q, kc, kc, bt, sl, out=torch.zeros_like(q), full_pages=512)
        # (its merge as a second launch: the option the inline merge replaced)
        balanced_decode(q, kc, kc, bt, sl, out=torch.zeros_like(q), full_pages=512,
                        inline_merge=False)
        # (pieces taken from a counter: a tooling option, compiled here so that a GPU A/B
        # does not meet a compile error)
        import sparse_kernels.balanced_decode as bd
        bd.PIECES_PER_PROGRAM = 2
        balanced_decode(q, kc, kc, bt, sl, out=torch.zeros_like(q), full_pages=512)
        bd.PIECES_PER_PROGRAM = 1
        # the layer-0 read counter of a decode step with a selection (the engine's CUDA-graph
        # capture runs decode steps first); its variant without one (decode rows folded into
        # an eager prefill step) must come from warm_up_decode below, which vLLM's start-up
        # runs: served without it, a 4K batch of a 128K engine compiled it (H100, session 22)
        sums = torch.zeros(4, dtype=torch.float64)
        k_default, _, _ = decode_budget_pages(SparseConfig(), 16)
        accumulate_decode_reads(torch.zeros(batch, hkv, k_default, dtype=torch.int32), sl, 16,
                                hkv, sums)
        warm_up_summary_update(kc, summ)
        kv_write(batch, hkv, group, d, kc, summ)
        # Prefill: every estimator and the block-sparse kernel, through the engine's warm-up
        # (length buckets up to 600 tokens, batches of one and two sequences).
        for method in PREFILL_METHODS:
            if method != "dense":
                warm_up_prefill(method, SparseConfig(), q[:1], kc, kc, 600, d ** -0.5)
        for method in ("topk", "dense"):
            warm_up_decode(method, SparseConfig(), q, kc, kc, d ** -0.5)
        serve(q, kc, summ, max_pages)


def kv_write(tokens, hkv, group, d, kc, summ, first=0) -> None:
    """The KV write of a top-k layer (and of a dense one: no summaries) as vLLM calls it: key
    and value are views into the fused QKV projection of ``tokens`` tokens (from token
    ``first``: views at any offset)."""
    from sparse_kernels.kv_write import write_kv_and_summaries

    hq = hkv * group
    qkv = torch.zeros(first + tokens, (hq + 2 * hkv) * d, dtype=kc.dtype)[first:]
    key = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    value = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
    slots = torch.arange(tokens, dtype=torch.int64)
    for s in (summ, None):
        write_kv_and_summaries(key, value, kc, kc, slots, s)


def serve(q, kc, summ, max_pages) -> None:
    """After the engine's warm-ups, shapes a server meets and the warm-ups did not run: other
    lengths (key-block counts of every divisibility), chunks, batch sizes and split counts,
    and metadata views that start at any request of a batch (the engine's per-run slices).
    Each kernel compiled here prints ``compiled-while-serving NAME``."""
    global _serving
    from sparse_kernels.block_sparse_prefill import prefill_block_metadata
    from sparse_kernels.config import PREFILL_METHODS, SparseConfig
    from sparse_kernels.page_summary import update_page_summaries
    from sparse_kernels.pipeline import decode_budget_pages, sparse_prefill_attention
    from sparse_kernels.balanced_decode import balanced_decode
    from sparse_kernels.decode_stats import accumulate_decode_reads
    from sparse_kernels.sparse_decode import DecodeWorkspace, MAX_SPLITS, sparse_decode

    _serving = True
    cfg = SparseConfig()
    hq, d = q.shape[1:]
    hkv = kc.shape[2]
    i32 = torch.int32
    lens = torch.tensor([577, 130, 250, 333, 520, 600, 64, 449], dtype=i32)
    qlens = [64, 100, 130, 37, 300, 1, 64, 17]
    table = torch.zeros(len(lens), max_pages, dtype=i32)
    for start, n in ((0, 1), (1, 1), (3, 2), (2, 3), (5, 3), (1, 7)):
        sl, bt = lens[start:start + n], table[start:start + n]
        ql = torch.tensor([0] + [min(a, int(b)) for a, b in zip(qlens[start:start + n], sl)])
        qsl = ql.cumsum(0).to(i32)
        tokens = int(qsl[-1])
        qq = torch.zeros(tokens, hq, d, dtype=q.dtype)
        meta = prefill_block_metadata(qsl, sl, cfg.block_size, num_tokens=tokens,
                                      max_seq_len=int(sl.max()))
        for method in PREFILL_METHODS:
            if method != "dense":
                sparse_prefill_attention(method, cfg, qq, kc, kc, bt, meta, torch.empty_like(qq),
                                         d ** -0.5)
        update_page_summaries(kc, summ, bt, qsl, sl, num_tokens=tokens)
        kv_write(tokens, hkv, hq // hkv, d, kc, summ, first=start)
    k, _, _ = decode_budget_pages(cfg, kc.shape[1])
    ws = DecodeWorkspace(8, hq, d, MAX_SPLITS, device=torch.device("cpu"))
    for n in (1, 3, 8):
        sel = torch.full((n, hkv, k), -1, dtype=i32)
        for splits in range(1, MAX_SPLITS + 1):
            for selected, row_filter in ((sel, "all"), (None, "all"), (sel, "select"),
                                         (None, "full")):
                sparse_decode(q.new_zeros(n, hq, d), kc, kc, table[1:1 + n], lens[1:1 + n],
                              selected=selected, out=torch.empty(n, hq, d, dtype=q.dtype),
                              num_splits=splits, workspace=ws, row_filter=row_filter,
                              full_pages=k + splits, min_split_tiles=splits)
        # the balanced dense-mode launch: every batch, filter and workspace, one variant
        for full_pages, segments in ((None, 0), (k + n, 64 + n)):
            wsb = DecodeWorkspace(n, hq, d, 1, device=torch.device("cpu"), segments=segments)
            balanced_decode(q.new_zeros(n, hq, d), kc, kc, table[1:1 + n], lens[1:1 + n],
                            out=torch.empty(n, hq, d, dtype=q.dtype), workspace=wsb,
                            full_pages=full_pages, programs=n + 2)
        # the layer-0 read counters of a step, with and without a selection
        sums = torch.zeros(4, dtype=torch.float64)
        accumulate_decode_reads(sel, lens[1:1 + n], kc.shape[1], hkv, sums)
        accumulate_decode_reads(None, lens[1:1 + n], kc.shape[1], hkv, sums)
    # a large grid (rows x KV heads above half the SMs): the full rows' launch has its own
    # pipeline depth there (full_rows_num_stages), compiled by warm_up_decode
    big = 40
    ws_big = DecodeWorkspace(big, hq, d, MAX_SPLITS, device=torch.device("cpu"))
    for splits in (1, 2, 3, 5, 9, 17, 33, MAX_SPLITS):
        sparse_decode(q.new_zeros(big, hq, d), kc, kc, torch.zeros(big, max_pages, dtype=i32),
                      torch.full((big,), 100, dtype=i32),
                      out=torch.empty(big, hq, d, dtype=q.dtype), num_splits=splits,
                      workspace=ws_big, row_filter="full", full_pages=2 * k)
    _serving = False


if __name__ == "__main__":
    sys.exit(main())

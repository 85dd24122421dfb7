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


def _compile_only(self, *args, grid, warmup, **kwargs):
    k = _run(self, *args, grid=grid, warmup=True, **kwargs)
    print(self.fn.__name__, "cubin" if "cubin" in k.asm else "no-cubin", flush=True)
    return k


jit.JITFunction.run = _compile_only


def main() -> None:
    from sparse_kernels import page_select as ps
    from sparse_kernels.config import PREFILL_METHODS, SparseConfig
    from sparse_kernels.pipeline import warm_up_prefill, warm_up_summary_update
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
        sel = torch.zeros(batch, hkv, 256, dtype=torch.int32)
        sparse_decode(q, kc, kc, bt, sl, selected=sel, out=torch.zeros_like(q), num_splits=4)
        warm_up_summary_update(kc, summ)
        # Prefill: every estimator and the block-sparse kernel, through the engine's warm-up
        # (length buckets up to 600 tokens, batches of one and two sequences).
        for method in PREFILL_METHODS:
            if method != "dense":
                warm_up_prefill(method, SparseConfig(), q[:1], kc, kc, 600, d ** -0.5)


if __name__ == "__main__":
    sys.exit(main())

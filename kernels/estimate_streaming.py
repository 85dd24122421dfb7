"""A-shape (StreamingLLM-style) block lists for sparse prefill.

Query block ``i`` keeps: the sink blocks ``0 .. cdiv(sink_tokens, B) - 1`` (the blocks covering
the first ``sink_tokens`` positions), the local blocks ``i - cdiv(local_tokens, B) .. i - 1`` (the
blocks covering the ``local_tokens`` positions before the query block starts) and the diagonal
``i``. The same for every KV head; no scoring, one tiny kernel launch.
"""

from __future__ import annotations

from sparse_kernels.block_select import build_block_lists
from sparse_kernels.block_sparse_prefill import PrefillBlockLists, PrefillBlockMeta
from sparse_kernels.host_math import cdiv

__all__ = ["streaming_block_counts", "estimate_streaming"]


def streaming_block_counts(block_size: int, sink_tokens: int, local_tokens: int) -> tuple[int, int]:
    """(sink blocks, local blocks) covering ``sink_tokens`` / ``local_tokens``."""
    return cdiv(sink_tokens, block_size), cdiv(local_tokens, block_size)


def estimate_streaming(
    meta: PrefillBlockMeta,
    num_kv_heads: int,
    *,
    sink_tokens: int,
    local_tokens: int,
) -> PrefillBlockLists:
    """A-shape lists ``[meta.num_q_blocks, num_kv_heads, meta.max_kv_blocks]`` + counts + density."""
    sink, local = streaming_block_counts(meta.block_size, sink_tokens, local_tokens)
    return build_block_lists(meta, num_kv_heads, sink_blocks=sink, local_blocks=local)

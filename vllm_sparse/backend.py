"""The sparse-serve attention backend for vLLM V1 (backend, metadata builder, impl).

It lives on vLLM's own paged KV cache (the TRITON_ATTN layout: logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K and V interleaved) and is selected
with ``--attention-backend CUSTOM`` once the plugin is registered.

Current state: the sparse kernels are not wired into the engine yet; every forward runs vLLM's
own dense Triton attention, and the backend says so once per process in the log. What is final already: registration, the
configuration parsed once and logged once, and start-up errors for model features the sparse
path will not serve.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from sparse_kernels.config import SparseConfigError, get_config

logger = logging.getLogger("vllm.sparse_serve")

_logged_config = False


def _vllm_sparse_config():
    """The process-wide SparseConfig, with vLLM's ``--additional-config '{"sparse": {...}}'``."""
    from vllm.config import get_current_vllm_config

    overrides = None
    try:
        additional = get_current_vllm_config().additional_config or {}
    except Exception:  # no current config (unit tests construct classes directly)
        additional = {}
    if isinstance(additional, dict) and "sparse" in additional:
        overrides = additional["sparse"]
        if not isinstance(overrides, dict):
            raise SparseConfigError(
                "--additional-config key 'sparse' must be an object, e.g. "
                "'{\"sparse\": {\"token_budget\": 4096}}'"
            )
    cfg = get_config(overrides)
    global _logged_config
    if not _logged_config:
        _logged_config = True
        logger.info("sparse-serve config: %s", cfg.summary())
    return cfg


class SparseAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    pass


class SparseAttentionBackend(TritonAttentionBackend):
    # The sparse kernels read bf16/fp16 K/V; quantized caches are refused at start-up.
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # vLLM 0.26 maps get_name() back to an AttentionBackendEnum member; ours is CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseAttentionImpl]:
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseAttentionMetadataBuilder]:
        return SparseAttentionMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in (64, 128)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class SparseAttentionImpl(TritonAttentionImpl):
    _warned_dense: ClassVar[bool] = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append(f"sliding window ({sliding_window})")
        if logits_soft_cap:
            unsupported.append(f"logits soft-cap ({logits_soft_cap})")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type}")
        if sinks is not None:
            unsupported.append("learned attention sinks")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            unsupported.append(f"KV cache dtype {kv_cache_dtype}")
        if head_size not in (64, 128):
            unsupported.append(f"head size {head_size}")
        if unsupported:
            raise SparseConfigError(
                "the sparse-serve backend cannot serve this model: "
                + ", ".join(unsupported)
                + " not supported; use the default attention backend for it"
            )
        self.sparse_config = _vllm_sparse_config()
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **kwargs)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is not None:
            if not SparseAttentionImpl._warned_dense:
                SparseAttentionImpl._warned_dense = True
                logger.warning(
                    "sparse-serve: sparse kernels are not wired into the vLLM backend yet; "
                    "running vLLM's dense Triton attention for every request")
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               output_scale, output_block_scale)

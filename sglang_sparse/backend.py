"""The sparse-serve attention backend for SGLang (``--attention-backend sparse``).

It lives on SGLang's own KV pool (``token_to_kv_pool``, addressed through ``req_to_token``).

Current state: the sparse kernels are not wired into the SGLang backend yet; it runs SGLang's
own dense Triton attention and says so once per process in the log. Final already: the
registry entry, the configuration parsed once and logged once, and start-up errors for model
features the sparse path will not serve.
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from sparse_kernels.config import SparseConfigError, get_config

logger = logging.getLogger("sparse_serve.sglang")


def check_model_supported(model_runner) -> None:
    """Refuse, at backend creation (before serving), models the sparse path cannot serve."""
    mc = model_runner.model_config
    unsupported = []
    if getattr(model_runner, "use_mla_backend", False):
        unsupported.append("MLA")
    if getattr(mc, "is_encoder_decoder", False):
        unsupported.append("encoder-decoder")
    if getattr(model_runner, "sliding_window_size", None) is not None:
        unsupported.append(f"sliding window ({model_runner.sliding_window_size})")
    head_dim = getattr(mc, "head_dim", None)
    if head_dim not in (64, 128):
        unsupported.append(f"head size {head_dim}")
    if unsupported:
        raise SparseConfigError(
            "the sparse-serve backend cannot serve this model: " + ", ".join(unsupported)
            + " not supported; use another --attention-backend for it")


class SparseAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, *args, **kwargs):
        check_model_supported(model_runner)
        self.sparse_config = get_config()
        logger.info("sparse-serve config: %s", self.sparse_config.summary())
        logger.warning(
            "sparse-serve: sparse kernels are not wired into the SGLang backend yet; "
            "running SGLang's dense Triton attention for every request")
        super().__init__(model_runner, *args, **kwargs)


def create_sparse_backend(runner):
    return SparseAttnBackend(runner)

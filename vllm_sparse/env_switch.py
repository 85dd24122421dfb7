"""``SPARSE_ATTN=1``: switch an existing vLLM deployment to the sparse backend with env vars alone.

vLLM 0.26 has no environment variable that picks an attention backend: the choice comes from
``--attention-backend`` (``AttentionConfig.backend``) or, when that is unset, from the platform's
automatic selection (``Platform.get_attn_backend_cls(selected_backend=None, ...)``).

With ``SPARSE_ATTN=1`` the plugin wraps that one classmethod of the current platform: where the
user named no backend and the layer is one the sparse backend can serve (decoder self-attention,
no MLA, no sliding window), it selects ``CUSTOM`` (our backend) instead of running the automatic
choice. An explicit ``--attention-backend`` always wins, and layers the sparse backend cannot
serve keep vLLM's automatic choice; both cases are logged.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.sparse_serve")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def env_switch_enabled() -> bool:
    raw = os.environ.get("SPARSE_ATTN", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    from sparse_kernels.config import SparseConfigError

    raise SparseConfigError(f"SPARSE_ATTN must be 0 or 1, got {raw!r}")


def install_env_switch() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "_sparse_serve_switch", False):
        return  # idempotent
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None:
            c = attn_selector_config
            if (c.attn_type == AttentionType.DECODER and not c.use_mla
                    and not c.has_sliding_window and not c.use_sparse):
                logger.info("SPARSE_ATTN=1: selecting the sparse-serve backend (CUSTOM)")
                selected_backend = AttentionBackendEnum.CUSTOM
            else:
                logger.warning(
                    "SPARSE_ATTN=1: a layer the sparse backend cannot serve (%s) keeps vLLM's "
                    "automatic backend choice (dense)", c)
        else:
            logger.info("SPARSE_ATTN=1 but --attention-backend %s was given; it wins",
                        getattr(selected_backend, "name", selected_backend))
        return original_func(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._sparse_serve_switch = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    logger.info("sparse-serve: SPARSE_ATTN=1, %s will select the sparse backend by default",
                platform_cls.__name__)

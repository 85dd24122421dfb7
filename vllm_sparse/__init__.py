"""sparse-serve's vLLM adapter.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process it
starts (API server, engine core, workers), before any model is built. It

1. parses the sparse-serve configuration once (``SPARSE_*`` env vars), so a bad value stops
   vLLM at startup with a clear error instead of failing mid-request;
2. registers :class:`vllm_sparse.backend.SparseAttentionBackend` in vLLM's ``CUSTOM`` slot
   (``--attention-backend CUSTOM``), and on vLLM versions that support named backends also as
   ``SPARSE``;
3. with ``SPARSE_ATTN=1``, makes vLLM pick the sparse backend wherever the user did not name a
   backend, so existing deployments switch on with env vars alone;
4. registers the Prometheus collector behind ``sparse_serve:*`` on ``/metrics``
   (:mod:`vllm_sparse.metrics`).

Registration is idempotent: calling ``register()`` again changes nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.sparse_serve")

BACKEND_CLASS_PATH = "vllm_sparse.backend.SparseAttentionBackend"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from sparse_kernels.config import get_config
    from vllm_sparse import compat
    from vllm_sparse.env_switch import env_switch_enabled, install_env_switch

    get_config()  # raises SparseConfigError on a bad SPARSE_* value, before serving starts
    if str(compat.vllm_version()) not in compat.TESTED_VERSIONS:
        logger.warning("sparse-serve is tested with vLLM %s; this is vLLM %s",
                       ", ".join(compat.TESTED_VERSIONS), compat.vllm_version())

    current = AttentionBackendEnum.CUSTOM.get_path() if AttentionBackendEnum.CUSTOM.is_overridden() else None
    if current not in (None, BACKEND_CLASS_PATH):
        raise RuntimeError(
            f"sparse-serve: vLLM's CUSTOM attention backend is already registered to {current!r} "
            "by another plugin; only one plugin can own CUSTOM on this vLLM version"
        )
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)

    if compat.supports_named_backends() and compat.NAMED_BACKEND not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(compat.NAMED_BACKEND, BACKEND_CLASS_PATH)

    if env_switch_enabled():
        install_env_switch()

    from vllm_sparse import metrics

    metrics.register_collector()

"""sparse-serve's SGLang adapter.

``register()`` is the ``sglang.srt.plugins`` entry point. SGLang calls it in every process it
starts (launcher, scheduler/worker processes) before it parses ``--attention-backend``. It

1. parses the sparse-serve configuration once (``SPARSE_*`` env vars);
2. registers the attention backend ``sparse`` in SGLang's attention registry
   (``sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS``);
3. adds ``sparse`` to the server's ``--attention-backend`` choices (SGLang validates the flag
   with argparse ``choices``).

SGLang logs and swallows exceptions raised by plugins; a half-registered plugin would then fail
later with a confusing "invalid choice". So on any failure this logs the cause and raises
``SystemExit``, which SGLang does not swallow. Registration is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("sparse_serve.sglang")

BACKEND_NAME = "sparse"


def register() -> None:
    try:
        _register()
    except Exception as e:  # noqa: BLE001 -- re-raised as SystemExit on purpose
        logger.exception("sparse-serve: SGLang plugin registration failed: %s", e)
        raise SystemExit(f"sparse-serve: SGLang plugin registration failed: {e}") from e


def _register() -> None:
    from sglang.srt import server_args
    from sglang.srt.layers.attention import attention_registry

    from sparse_kernels.config import get_config
    from sglang_sparse.backend import create_sparse_backend

    get_config()  # raises SparseConfigError on a bad SPARSE_* value, before serving starts

    existing = attention_registry.ATTENTION_BACKENDS.get(BACKEND_NAME)
    if existing is not None and existing is not create_sparse_backend:
        raise RuntimeError(
            f"SGLang attention backend {BACKEND_NAME!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    attention_registry.register_attention_backend(BACKEND_NAME)(create_sparse_backend)
    if BACKEND_NAME not in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.add_attention_backend_choices([BACKEND_NAME])

"""Small version checks for the vLLM APIs sparse-serve touches. No forks, no copies.

Target: vLLM 0.26.0. Newer releases (0.33) add named backends
(``AttentionBackendEnum.register``) and drop ``AttentionBackend.get_kv_cache_shape``.
"""

from __future__ import annotations

from functools import cache

from packaging.version import Version

NAMED_BACKEND = "SPARSE"  # the name used where vLLM can register named backends
TESTED_VERSIONS = ("0.26.0",)


@cache
def vllm_version() -> Version:
    import vllm

    return Version(vllm.__version__.split("+")[0])


def supports_named_backends() -> bool:
    """vLLM >= 0.33 can add enum members at run time."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return callable(getattr(AttentionBackendEnum, "register", None))

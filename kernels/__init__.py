"""sparse_kernels: engine-agnostic Triton kernels, references and config for sparse-serve.

This folder is ``kernels/`` in the repository and installs as the top-level package
``sparse_kernels`` (see setup.py): the name ``kernels`` belongs to a PyPI package that
SGLang depends on.
"""

from .config import SparseConfig, SparseConfigError, get_config

__all__ = ["SparseConfig", "SparseConfigError", "get_config"]

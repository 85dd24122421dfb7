"""Packaging for sparse-serve.

Three packages install from this repository:

* ``vllm_sparse``   -- the vLLM adapter (entry point group ``vllm.general_plugins``);
* ``sglang_sparse`` -- the SGLang adapter (entry point group ``sglang.srt.plugins``);
* ``sparse_kernels`` -- the engine-agnostic core, kept in the ``kernels/`` folder.

The core is *mapped* from ``kernels/`` to the import name ``sparse_kernels`` through
``package_dir``. It must not install as a top-level ``kernels`` module: that name belongs to the
PyPI package ``kernels`` (Hugging Face kernel hub), which SGLang itself depends on, and a
``kernels`` package of ours would overwrite it in site-packages.
"""

import os
import sys

# The repository root must not be importable while this script runs: its kernels/ folder would
# shadow the PyPI package `kernels`, whose `egg_info.writers` entry point setuptools imports
# during the build whenever `kernels` is installed (it is, wherever SGLang is).
_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from setuptools import setup  # noqa: E402

VLLM_VERSION = "0.26.0"
SGLANG_VERSION = "0.5.15"

setup(
    name="sparse-serve",
    version="0.1.0",
    description="Training-free sparse attention (sparse prefill, top-k page decode) as "
    "vLLM and SGLang attention-backend plugins",
    long_description=open(os.path.join(_ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["sparse_kernels", "vllm_sparse", "sglang_sparse"],
    package_dir={
        "sparse_kernels": "kernels",
        "vllm_sparse": "vllm_sparse",
        "sglang_sparse": "sglang_sparse",
    },
    install_requires=["torch", "triton"],
    extras_require={
        "vllm": [f"vllm=={VLLM_VERSION}"],
        "sglang": [f"sglang=={SGLANG_VERSION}"],
        "test": ["pytest>=7", "numpy", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["sparse_serve = vllm_sparse:register"],
        "sglang.srt.plugins": ["sparse_serve = sglang_sparse:register"],
    },
)

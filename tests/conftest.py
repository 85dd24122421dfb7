"""Shared test setup.

Engine tests (tests/vllm, tests/sglang) need the real engines installed. Locally they skip when
an engine is missing; CI names the engines it installed in ``SPARSE_SERVE_TEST_ENGINES``
(comma-separated) and then a missing engine is a failure, not a skip.
"""

import importlib
import os

import pytest

# Kernels run on the CPU through Triton's interpreter unless a GPU run says otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Engines CI says it installed must import; otherwise their tests would silently skip."""
    required = [e.strip() for e in os.environ.get("SPARSE_SERVE_TEST_ENGINES", "").split(",")]
    for name in filter(None, required):
        importlib.import_module(name)


@pytest.fixture(autouse=True)
def _clean_sparse_env(monkeypatch):
    """No test sees SPARSE_* settings from the shell or from another test."""
    for key in list(os.environ):
        if key.startswith("SPARSE_") and not key.startswith("SPARSE_SERVE_"):
            monkeypatch.delenv(key)
    from sparse_kernels import config

    config._CACHED.clear()
    yield
    config._CACHED.clear()

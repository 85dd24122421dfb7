"""The SGLang plugin, against the real SGLang (CPU only: registry, CLI choices, failures)."""

import argparse
import pathlib
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

sglang = pytest.importorskip("sglang")

from sglang.srt import server_args  # noqa: E402
from sglang.srt.layers.attention import attention_registry  # noqa: E402

import sglang_sparse  # noqa: E402
from sglang_sparse.backend import create_sparse_backend  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry():
    attention_registry.ATTENTION_BACKENDS.pop("sparse", None)
    while "sparse" in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.ATTENTION_BACKEND_CHOICES.remove("sparse")
    yield
    attention_registry.ATTENTION_BACKENDS.pop("sparse", None)


def test_entry_point_resolves_to_register():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.value == "sglang_sparse:register"]
    assert len(eps) == 1
    assert eps[0].load() is sglang_sparse.register


def test_register_adds_backend_and_cli_choice_idempotently():
    sglang_sparse.register()
    sglang_sparse.register()
    assert attention_registry.ATTENTION_BACKENDS["sparse"] is create_sparse_backend
    assert server_args.ATTENTION_BACKEND_CHOICES.count("sparse") == 1
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "dummy", "--attention-backend", "sparse"])
    assert args.attention_backend == "sparse"


def test_cli_rejects_sparse_without_the_plugin():
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "dummy", "--attention-backend", "sparse"])


def test_sglang_plugin_loader_runs_register():
    from sglang.srt import plugins

    plugins._plugins_loaded = False
    plugins.load_plugins()
    assert attention_registry.ATTENTION_BACKENDS["sparse"] is create_sparse_backend


def test_failure_is_not_swallowed(monkeypatch):
    # SGLang's loader catches Exception; our register() turns failures into SystemExit.
    monkeypatch.setenv("SPARSE_PREFILL_METHOD", "nope")
    with pytest.raises(SystemExit, match="unknown prefill_method 'nope'"):
        sglang_sparse.register()
    assert "sparse" not in attention_registry.ATTENTION_BACKENDS


def test_our_core_does_not_shadow_the_kernels_package(tmp_path):
    # SGLang depends on the PyPI package `kernels`; our core installs as `sparse_kernels`.
    # Run outside the repository, where only installed packages are importable.
    code = ("import kernels, sparse_kernels, sglang_sparse, vllm_sparse; "
            "print(kernels.__file__); print(sparse_kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert "site-packages" in out[0] and "/kernels/" in out[0]
    assert not out[0].startswith(str(pathlib.Path(sparse_kernels_dir()).parent))
    assert out[1] == str(pathlib.Path(sparse_kernels_dir()) / "__init__.py")


def sparse_kernels_dir():
    import sparse_kernels

    return pathlib.Path(sparse_kernels.__file__).parent


def test_backend_refuses_unsupported_models():
    from types import SimpleNamespace

    from sparse_kernels.config import SparseConfigError
    from sglang_sparse.backend import check_model_supported

    ok = SimpleNamespace(use_mla_backend=False, sliding_window_size=None,
                         model_config=SimpleNamespace(is_encoder_decoder=False, head_dim=128))
    check_model_supported(ok)
    bad = SimpleNamespace(use_mla_backend=True, sliding_window_size=4096,
                          model_config=SimpleNamespace(is_encoder_decoder=False, head_dim=96))
    with pytest.raises(SparseConfigError, match="MLA, sliding window .4096., head size 96"):
        check_model_supported(bad)

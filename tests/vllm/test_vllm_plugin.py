"""The vLLM plugin, against the real vLLM (CPU only: registry, selection, start-up checks)."""

from importlib.metadata import entry_points

import pytest

vllm = pytest.importorskip("vllm")

from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

import vllm_sparse  # noqa: E402
from sparse_kernels.config import SparseConfigError  # noqa: E402
from vllm_sparse.backend import SparseAttentionBackend, SparseAttentionImpl  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry():
    AttentionBackendEnum.CUSTOM.clear_override()
    yield
    AttentionBackendEnum.CUSTOM.clear_override()


def test_entry_point_resolves_to_register():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value == "vllm_sparse:register"]
    assert len(eps) == 1
    assert eps[0].load() is vllm_sparse.register


def test_register_fills_custom_slot_idempotently():
    with pytest.raises(ValueError, match="must be registered"):
        AttentionBackendEnum.CUSTOM.get_class()
    vllm_sparse.register()
    vllm_sparse.register()
    assert AttentionBackendEnum.CUSTOM.get_class() is SparseAttentionBackend
    assert SparseAttentionBackend.get_name() == "CUSTOM"
    # vLLM maps get_name() back to the enum when building layers.
    assert AttentionBackendEnum[SparseAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM


def test_vllm_plugin_loader_runs_register():
    from vllm import plugins

    plugins.plugins_loaded = False
    plugins.load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_class() is SparseAttentionBackend


def test_register_refuses_custom_owned_by_another_plugin():
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(AttentionBackendEnum.CUSTOM, "other.plugin.Backend")
    with pytest.raises(RuntimeError, match="already registered to 'other.plugin.Backend'"):
        vllm_sparse.register()


def test_register_fails_early_on_bad_config(monkeypatch):
    monkeypatch.setenv("SPARSE_DECODE_METHOD", "nope")
    with pytest.raises(SparseConfigError, match="unknown decode_method"):
        vllm_sparse.register()


def test_selection_reuse_is_accepted_from_env_and_additional_config(monkeypatch):
    """selection_reuse > 1 (implemented by the backend since session 20) registers from the
    environment and reads from --additional-config; a bad value still fails at startup."""
    from vllm_sparse.backend import vllm_sparse_config

    monkeypatch.setenv("SPARSE_SELECTION_REUSE", "4")
    vllm_sparse.register()
    monkeypatch.setenv("SPARSE_SELECTION_REUSE", "0")
    with pytest.raises(SparseConfigError, match="selection_reuse must be >= 1"):
        vllm_sparse.register()
    monkeypatch.delenv("SPARSE_SELECTION_REUSE")

    class FakeVllmConfig:
        additional_config = {"sparse": {"selection_reuse": 2}}

    assert vllm_sparse_config(FakeVllmConfig()).selection_reuse == 2


def _validate(**overrides):
    import torch
    from vllm.platforms.interface import DeviceCapability

    args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                attn_type="decoder", has_sliding_window=False)
    args.update(overrides)
    return SparseAttentionBackend.validate_configuration(**args)


def test_backend_accepts_plain_decoder_and_refuses_unsupported_features():
    assert _validate() == []
    assert "MLA not supported" in _validate(use_mla=True)
    assert "sliding window not supported" in _validate(has_sliding_window=True)
    assert "kv_cache_dtype not supported" in _validate(kv_cache_dtype="fp8")
    assert "head_size not supported" in _validate(head_size=96)
    assert "attention sinks not supported" in _validate(has_sink=True)
    assert any("attention type" in r for r in _validate(attn_type="encoder_decoder"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alibi_slopes=[1.0] * 8), "ALiBi"),
    (dict(sliding_window=4096), "sliding window"),
    (dict(logits_soft_cap=30.0), "soft-cap"),
    (dict(kv_cache_dtype="fp8"), "KV cache dtype fp8"),
])
def test_impl_refuses_model_features_at_startup(kwargs, match):
    base = dict(num_heads=8, head_size=128, scale=128 ** -0.5, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    base.update(kwargs)
    with pytest.raises(SparseConfigError, match=match):
        SparseAttentionImpl(**base)


def test_impl_builds_for_a_plain_layer():
    impl = SparseAttentionImpl(num_heads=8, head_size=128, scale=128 ** -0.5, num_kv_heads=2,
                               alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    assert impl.num_queries_per_kv == 4
    assert impl.cfg.decode_method == "topk"


def test_env_switch_selects_custom_only_when_no_backend_was_named(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_sparse import env_switch

    platform_cls = type(current_platform)
    seen = []

    def fake_get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        seen.append(selected_backend)
        return "picked"

    monkeypatch.setattr(platform_cls, "get_attn_backend_cls", classmethod(fake_get_attn_backend_cls))
    monkeypatch.setenv("SPARSE_ATTN", "1")
    vllm_sparse.register()
    vllm_sparse.register()  # idempotent: wraps once
    cfg = AttentionSelectorConfig(head_size=128, dtype=None, kv_cache_dtype="auto", block_size=16)
    platform_cls.get_attn_backend_cls(None, cfg)
    platform_cls.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, cfg)
    platform_cls.get_attn_backend_cls(None, cfg._replace(has_sliding_window=True))
    assert seen == [AttentionBackendEnum.CUSTOM, AttentionBackendEnum.FLASH_ATTN, None]

    monkeypatch.setenv("SPARSE_ATTN", "maybe")
    with pytest.raises(SparseConfigError, match="SPARSE_ATTN must be 0 or 1"):
        env_switch.env_switch_enabled()


def test_named_backend_on_vllm_versions_that_have_it(monkeypatch):
    """vLLM >= 0.33 adds AttentionBackendEnum.register: the plugin also registers SPARSE, once."""
    from vllm_sparse import compat

    calls = []

    def fake_register(cls, name, value):  # what 0.33 does, minus the real enum surgery
        calls.append((name, value))
        member = object.__new__(cls)
        member._name_, member._value_ = name, value
        cls._member_map_[name] = member
        return member

    monkeypatch.setattr(AttentionBackendEnum, "register", classmethod(fake_register),
                        raising=False)
    # On vLLM >= 0.33 an earlier register() in this process added SPARSE for real.
    earlier = AttentionBackendEnum._member_map_.pop(compat.NAMED_BACKEND, None)
    try:
        assert compat.supports_named_backends()
        vllm_sparse.register()
        vllm_sparse.register()
        assert calls == [(compat.NAMED_BACKEND, vllm_sparse.BACKEND_CLASS_PATH)]
    finally:
        AttentionBackendEnum._member_map_.pop(compat.NAMED_BACKEND, None)
        if earlier is not None:
            AttentionBackendEnum._member_map_[compat.NAMED_BACKEND] = earlier
    assert AttentionBackendEnum.CUSTOM.get_class() is SparseAttentionBackend


def test_no_named_backend_on_vllm_0_26():
    from vllm_sparse import compat

    if compat.vllm_version().release[:2] != (0, 26):
        pytest.skip(f"checks vLLM 0.26 behaviour; installed {compat.vllm_version()}")
    assert not compat.supports_named_backends()
    vllm_sparse.register()
    assert compat.NAMED_BACKEND not in AttentionBackendEnum.__members__

import json

import pytest

from sparse_kernels.config import SparseConfig, SparseConfigError, get_config


def test_defaults_are_valid():
    cfg = SparseConfig.from_sources(environ={})
    assert cfg == SparseConfig()
    assert cfg.prefill_method == "dense" and cfg.decode_method == "topk"


def test_env_vars_are_read_and_typed():
    cfg = SparseConfig.from_sources(environ={
        "SPARSE_PREFILL_METHOD": "Streaming", "SPARSE_DECODE_METHOD": "dense",
        "SPARSE_TOKEN_BUDGET": "2048", "SPARSE_SINK_TOKENS": "16", "SPARSE_LOCAL_TOKENS": "256",
        "SPARSE_MIN_SEQ_LEN": "8192", "SPARSE_XATTN_THRESHOLD": "0.95",
        "PATH": "/bin", "SPARSE_SERVE_TEST_ENGINES": "vllm", "SPARSE_ATTN": "1",
    })
    assert cfg.prefill_method == "streaming"
    assert cfg.decode_method == "dense"
    assert (cfg.token_budget, cfg.sink_tokens, cfg.local_tokens) == (2048, 16, 256)
    assert cfg.min_seq_len == 8192 and cfg.xattn_threshold == 0.95


def test_streaming_local_tokens_is_not_bound_by_the_decode_budget():
    """The streaming prefill window is not part of decode's budget: a window wider than the
    budget is valid (local_tokens that wide is not, see the impossible-budget case)."""
    cfg = SparseConfig.from_sources(environ={"SPARSE_STREAMING_LOCAL_TOKENS": "16384"})
    assert cfg.token_budget == 8192 and cfg.prefill_local_tokens == 16384
    assert cfg.local_tokens == 512


def test_decode_min_seq_len():
    """0 (the default) resolves to twice the token budget; set, it is taken as is; it is read
    from the env and the engine dict and shows in the logged summary."""
    cfg = SparseConfig.from_sources(environ={"SPARSE_TOKEN_BUDGET": "2048"})
    assert cfg.decode_min_seq_len == 0 and cfg.effective_decode_min_seq_len == 4096
    cfg = SparseConfig.from_sources(environ={"SPARSE_DECODE_MIN_SEQ_LEN": "6000"})
    assert cfg.decode_min_seq_len == 6000 and cfg.effective_decode_min_seq_len == 6000
    cfg = SparseConfig.from_sources(environ={"SPARSE_DECODE_MIN_SEQ_LEN": "6000"},
                                    overrides={"decode_min_seq_len": 512})
    assert cfg.effective_decode_min_seq_len == 512
    assert json.loads(cfg.summary())["decode_min_seq_len"] == 512


@pytest.mark.parametrize("raw, want", [("0", False), ("false", False), ("Off", False),
                                       ("1", True), ("yes", True), ("true", True)])
def test_bool_fields_from_env(raw, want):
    cfg = SparseConfig.from_sources(environ={"SPARSE_DECODE_OVERLAP": raw})
    assert cfg.decode_overlap is want
    assert SparseConfig.from_sources(environ={}, overrides={"decode_overlap": want}
                                     ).decode_overlap is want


def test_overrides_beat_env():
    cfg = SparseConfig.from_sources(environ={"SPARSE_TOKEN_BUDGET": "2048"},
                                    overrides={"token_budget": 8192})
    assert cfg.token_budget == 8192


@pytest.mark.parametrize("environ, overrides, match", [
    ({"SPARSE_TOKEN_BUGDET": "10"}, None, "unknown sparse-serve environment variable"),
    ({}, {"token_bugdet": 10}, "unknown sparse-serve config key 'token_bugdet'"),
    ({"SPARSE_PREFILL_METHOD": "magic"}, None, "unknown prefill_method 'magic'"),
    ({"SPARSE_DECODE_METHOD": "quest2"}, None, "unknown decode_method"),
    ({"SPARSE_DECODE_SELECT": "two_stage"}, None, "unknown decode_select"),
    ({"SPARSE_DECODE_DENSE_ROWS": "fa3"}, None, "unknown decode_dense_rows"),
    ({"SPARSE_DECODE_DENSE_KERNEL": "streamk"}, None, "unknown decode_dense_kernel"),
    ({"SPARSE_DECODE_OVERLAP": "maybe"}, None, "cannot read 'maybe' as bool"),
    ({}, {"decode_overlap": 2}, "cannot read 2 as bool"),
    ({"SPARSE_TOKEN_BUDGET": "lots"}, None, "SPARSE_TOKEN_BUDGET: cannot read 'lots' as int"),
    ({"SPARSE_TOKEN_BUDGET": "0"}, None, "token_budget must be >= 1"),
    ({"SPARSE_SINK_TOKENS": "-1"}, None, "sink_tokens must be >= 0"),
    ({"SPARSE_DECODE_MIN_SEQ_LEN": "-4096"}, None, "decode_min_seq_len must be >= 0"),
    ({"SPARSE_PREFILL_DENSE_LAST_BLOCKS": "-1"}, None, "prefill_dense_last_blocks must be >= 0"),
    ({"SPARSE_DECODE_MIN_SEQ_LEN": "8k"}, None, "cannot read '8k' as int"),
    ({"SPARSE_TOKEN_BUDGET": "256", "SPARSE_LOCAL_TOKENS": "512"}, None, "impossible budget"),
    ({"SPARSE_STREAMING_LOCAL_TOKENS": "-64"}, None, "streaming_local_tokens must be >= 0"),
    ({"SPARSE_XATTN_THRESHOLD": "1.5"}, None, r"xattn_threshold must be in \(0, 1\]"),
    ({"SPARSE_BLOCK_SIZE": "48"}, None, "block_size must be a power of two"),
    ({"SPARSE_XATTN_STRIDE": "3"}, None, "xattn_stride .* must divide block_size"),
    ({}, {"token_budget": 1.5}, "cannot read 1.5 as int"),
    ({}, {"head_overrides": []}, "unknown sparse-serve config key"),
    ({"SPARSE_HEAD_CONFIG": "/nonexistent/heads.json"}, None, "cannot read"),
])
def test_bad_config_is_refused_with_a_clear_error(environ, overrides, match):
    with pytest.raises(SparseConfigError, match=match):
        SparseConfig.from_sources(environ=environ, overrides=overrides)


def test_check_model():
    cfg = SparseConfig(token_budget=4096, sink_tokens=64, local_tokens=512)
    cfg.check_model(head_size=128, page_size=16, num_kv_heads=8)
    with pytest.raises(SparseConfigError, match="head sizes 64 and 128"):
        cfg.check_model(head_size=96, page_size=16, num_kv_heads=8)
    with pytest.raises(SparseConfigError, match="multiple of the KV page size"):
        SparseConfig(token_budget=4000, sink_tokens=0, local_tokens=0).check_model(
            head_size=128, page_size=64, num_kv_heads=8)
    # 80 sink + 480 local tokens fit a 576-token budget, but round up to 2 + 8 pages of 64,
    # more than the 9 pages the budget buys.
    cfg = SparseConfig(token_budget=576, sink_tokens=80, local_tokens=480)
    cfg.check_model(head_size=128, page_size=16, num_kv_heads=8)
    with pytest.raises(SparseConfigError, match="impossible budget"):
        cfg.check_model(head_size=128, page_size=64, num_kv_heads=8)


def test_head_config_file(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"overrides": [
        {"layers": "all", "heads": "all", "prefill_method": "vertical_slash"},
        {"layers": [1], "heads": [0, 2], "prefill_method": "streaming", "decode_method": "dense"},
    ]}))
    cfg = SparseConfig.from_sources(environ={"SPARSE_HEAD_CONFIG": str(path)})
    assert len(cfg.head_overrides) == 2
    prefill0, decode0 = cfg.methods_for(0)
    assert prefill0 == {None: "vertical_slash"} and decode0 == {None: "topk"}
    prefill1, decode1 = cfg.methods_for(1)
    assert prefill1 == {None: "vertical_slash", 0: "streaming", 2: "streaming"}
    assert decode1 == {None: "topk", 0: "dense", 2: "dense"}
    with pytest.raises(SparseConfigError, match="KV head 2 but the model has 2"):
        cfg.check_model(head_size=64, page_size=16, num_kv_heads=2)


@pytest.mark.parametrize("doc, match", [
    ({"overrides": [{"heads": [0]}]}, "names neither"),
    ({"overrides": [{"heads": [0], "prefill_method": "nope"}]}, "unknown head_config prefill_method"),
    ({"overrides": [{"heads": "some", "decode_method": "dense"}]}, "expected \"all\""),
    ({"overrides": [{"color": 1, "decode_method": "dense"}]}, "unknown keys"),
    ({"rules": []}, "expected an object"),
])
def test_bad_head_config(tmp_path, doc, match):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SparseConfigError, match=match):
        SparseConfig.from_sources(environ={"SPARSE_HEAD_CONFIG": str(path)})


def test_get_config_parses_once(monkeypatch):
    monkeypatch.setenv("SPARSE_TOKEN_BUDGET", "2048")
    a = get_config()
    assert get_config() is a and a.token_budget == 2048
    monkeypatch.setenv("SPARSE_TOKEN_BUDGET", "1024")
    assert get_config().token_budget == 1024


def test_selection_reuse_after():
    """A request's first tokens select afresh before reuse starts: 32 by default, from the env
    and the engine dict, 0 allowed (reuse from the first token), negative refused."""
    assert SparseConfig().selection_reuse_after == 32
    cfg = SparseConfig.from_sources(environ={"SPARSE_SELECTION_REUSE": "4",
                                             "SPARSE_SELECTION_REUSE_AFTER": "0"})
    assert (cfg.selection_reuse, cfg.selection_reuse_after) == (4, 0)
    cfg = SparseConfig.from_sources(environ={}, overrides={"selection_reuse_after": 64})
    assert json.loads(cfg.summary())["selection_reuse_after"] == 64
    with pytest.raises(SparseConfigError, match="selection_reuse_after must be >= 0"):
        SparseConfig.from_sources(environ={"SPARSE_SELECTION_REUSE_AFTER": "-1"})

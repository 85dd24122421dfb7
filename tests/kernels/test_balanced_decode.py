"""Dense paged decode balanced over programs (stream-K) vs dense attention."""

import os

import pytest
import torch

from sparse_kernels.balanced_decode import balanced_decode, default_programs
from sparse_kernels.reference import dense_attention, random_paged_kv
from sparse_kernels.sparse_decode import DecodeWorkspace

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _setup(seq_lens, group, head_dim, page, dtype, layout, num_kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v, bt = random_paged_kv(seq_lens, num_kv_heads, head_dim, page, dtype, layout,
                               generator=g)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    return [x.to(DEVICE) for x in (q, k, v, bt, torch.tensor(seq_lens, dtype=torch.int32))]


def _dense_ref(q, k, v, bt, sl):
    c = [x.cpu() for x in (q, k, v, bt, sl)]
    qsl = torch.arange(len(sl) + 1, dtype=torch.int32)
    return dense_attention(*c[:4], qsl, c[4])


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)


def _poisoned_workspace(batch, q, programs, partial_dtype=None, pieces=1):
    ws = DecodeWorkspace(batch, q.shape[1], q.shape[2], max_splits=2, device=DEVICE,
                         partial_dtype=partial_dtype, segments=programs * pieces + batch + 2)
    # the merge must read only the segments the programs wrote; the split partials are not
    # used (a sparse_decode launch beside this one may own them)
    for buf in (ws.partial_out, ws.partial_lse, ws.segment_out, ws.segment_lse):
        buf.fill_(float("nan"))
    return ws


# (dtype, layout, page, group, head_dim, programs, block_n): GQA groups 1, 4, 7, 8, head dims
# 64 and 128, page sizes 1, 16 and 64, every layout; programs from one (every row whole in one
# program) to more than there are tiles (programs without work)
CASES = [
    (torch.float32, "NHD", 16, 4, 64, 1, 16),
    (torch.float32, "HND", 1, 7, 128, 3, 16),
    (torch.float32, "interleaved", 64, 8, 64, 5, 32),
    (torch.bfloat16, "interleaved", 16, 8, 128, 7, 32),
    (torch.bfloat16, "NHD", 64, 1, 64, 64, 16),
    (torch.float16, "HND", 16, 7, 64, 2, 32),
]


def _counters_reset(ws):
    """The inline merge's arrival counters are back at zero (a CUDA graph replays the launch
    with them as they are)."""
    assert not ws.segment_counters.any()


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("dtype,layout,page,group,head_dim,programs,block_n", CASES)
def test_matches_dense_attention(dtype, layout, page, group, head_dim, programs, block_n,
                                 inline):
    # ragged: partial last pages, a 1-token sequence, an empty (padding) row, a long row that
    # spans several programs beside short ones that share one
    seq_lens = [1, 77, 3 * page + 5, 0, 33, 300]
    q, k, v, bt, sl = _setup(seq_lens, group, head_dim, page, dtype, layout)
    ws = _poisoned_workspace(len(seq_lens), q, programs)
    out = torch.full_like(q, float("nan"))
    balanced_decode(q, k, v, bt, sl, out=out, workspace=ws, programs=programs,
                    block_n=block_n, inline_merge=inline)
    assert out.dtype == dtype and out.shape == q.shape
    want = _dense_ref(q, k, v, bt, sl)
    want[3] = 0  # an empty row is written as zeros
    _close(out, want, dtype)
    assert torch.isnan(ws.partial_out).all() and torch.isnan(ws.partial_lse).all()
    _counters_reset(ws)
    # the same launch again on the same workspace (a replay): the same output
    again = balanced_decode(q, k, v, bt, sl, workspace=ws, programs=programs, block_n=block_n,
                            inline_merge=inline)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    _counters_reset(ws)


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("programs", [1, 2, 5, 16, 40])
def test_full_pages_filter(programs, inline):
    """``full_pages``: only sequences of at most that many pages are written (the others keep
    NaN), each equal to dense attention, whatever the programs' cuts."""
    page, full_pages = 16, 6
    seq_lens = [96, 97, 1, 0, 500, 80, 33, 1000, 95]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, page, torch.float32, "NHD", seed=3)
    ws = _poisoned_workspace(len(seq_lens), q, programs)
    out = torch.full_like(q, float("nan"))
    balanced_decode(q, k, v, bt, sl, out=out, workspace=ws, programs=programs, block_n=16,
                    full_pages=full_pages, inline_merge=inline)
    mine = torch.tensor([-(-s // page) <= full_pages for s in seq_lens], device=DEVICE)
    want = _dense_ref(q, k, v, bt, sl)
    want[3] = 0
    _close(out[mine], want[mine.cpu()], torch.float32)
    assert torch.isnan(out[~mine]).all()
    _counters_reset(ws)


@pytest.mark.parametrize("merge_segments", [1, 4, 8])
@pytest.mark.parametrize("inline", [True, False])
def test_rows_cut_into_many_segments(inline, merge_segments, monkeypatch):
    """Rows cut into many segments (programs without work in between, more programs than
    tiles) merge to dense attention, loaded one or several segments at a time (a row's
    segments not a multiple of that); leading, trailing and only empty rows are zeros."""
    from sparse_kernels import balanced_decode as bd

    monkeypatch.setattr(bd, "MERGE_SEGMENTS", merge_segments)
    cases = [[400, 3, 0, 250, 17], [0, 0, 250, 0, 17, 0], [0, 0, 0]]
    for case, seq_lens in enumerate(cases):
        q, k, v, bt, sl = _setup(seq_lens, 4, 64, 16, torch.float32, "NHD", seed=11 + case)
        for programs in (6, 45, 80):
            ws = _poisoned_workspace(len(seq_lens), q, programs)
            out = torch.full_like(q, float("nan"))
            balanced_decode(q, k, v, bt, sl, out=out, workspace=ws, programs=programs,
                            block_n=16, inline_merge=inline)
            want = _dense_ref(q, k, v, bt, sl)
            want[torch.tensor(seq_lens) == 0] = 0
            _close(out, want, torch.float32)
            _counters_reset(ws)


def test_scan_crosses_chunks(monkeypatch):
    """A batch longer than one scan chunk (prefix sums carried across chunks), every row
    short, with as many programs as rows and rows cut anywhere."""
    from sparse_kernels import balanced_decode as bd

    monkeypatch.setattr(bd, "SCAN_BLOCK", 16)
    g = torch.Generator().manual_seed(5)
    seq_lens = torch.randint(0, 70, (37,), generator=g).tolist()
    q, k, v, bt, sl = _setup(seq_lens, 2, 64, 16, torch.float32, "HND", seed=6)
    for programs in (3, 37, 50):
        ws = _poisoned_workspace(len(seq_lens), q, programs)
        out = balanced_decode(q, k, v, bt, sl, workspace=ws, programs=programs, block_n=16)
        want = _dense_ref(q, k, v, bt, sl)
        want[torch.tensor(seq_lens) == 0] = 0
        _close(out, want, torch.float32)


def test_bf16_partials_and_small_workspace():
    """bf16 partials (a workspace's partial_dtype) stay within bf16 tolerance; a workspace too
    small for ``programs + batch`` segments is replaced, not overrun."""
    seq_lens = [700, 33, 1000]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, 16, torch.bfloat16, "NHD", seed=7)
    ws = _poisoned_workspace(len(seq_lens), q, 16, partial_dtype=torch.bfloat16)
    out = balanced_decode(q, k, v, bt, sl, workspace=ws, programs=16, block_n=16)
    _close(out, _dense_ref(q, k, v, bt, sl), torch.bfloat16)
    for segments in (0, 18):  # none, one too few
        tiny = DecodeWorkspace(1, q.shape[1], 64, max_splits=1, device=DEVICE,
                               segments=segments)
        if segments:
            tiny.segment_out.fill_(float("nan"))
        out = balanced_decode(q, k, v, bt, sl, workspace=tiny, programs=16, block_n=16)
        _close(out, _dense_ref(q, k, v, bt, sl), torch.bfloat16)
        if segments:
            assert torch.isnan(tiny.segment_out).all()


def test_inline_merge_only_for_bounded_rows(monkeypatch):
    """The inline merge is the default for launches of rows of at most ``full_pages`` pages
    (top-k decode's full rows), not for dense decode's rows of any length."""
    from sparse_kernels import balanced_decode as bd

    assert bd.use_inline_merge(512) and bd.use_inline_merge(0)
    assert not bd.use_inline_merge(None)
    monkeypatch.setattr(bd, "INLINE_MERGE", 0)
    assert not bd.use_inline_merge(512)


def test_default_programs(monkeypatch):
    from sparse_kernels import balanced_decode as bd

    monkeypatch.setattr(bd, "_device_sms", lambda device: 132)
    assert default_programs(8, torch.device("cpu")) == 66  # 4 per SM over 8 KV heads
    assert default_programs(1, torch.device("cpu")) == 528


def test_tooling_env_sets_launch_constants(monkeypatch):
    from sparse_kernels import balanced_decode as bd

    for name in bd._TUNABLE:
        monkeypatch.setattr(bd, name, getattr(bd, name))  # restored after the test
    assert bd._apply_tooling_env("programs_per_sm=4, BLOCK_N=64") == {
        "PROGRAMS_PER_SM": 4, "BLOCK_N": 64}
    assert bd.PROGRAMS_PER_SM == 4 and bd.BLOCK_N == 64
    assert bd._apply_tooling_env(None) == {}
    with pytest.raises(ValueError, match="unknown constant"):
        bd._apply_tooling_env("WAVES=3")


@pytest.mark.parametrize("pieces", [2, 3])
@pytest.mark.parametrize("inline", [True, False])
def test_pieces_taken_from_a_counter(pieces, inline, monkeypatch):
    """PIECES_PER_PROGRAM > 1: each program attends its own piece, then takes the next free
    one from a per-head counter. Rows cut into many pieces (and programs with none) merge to
    dense attention, padding rows are zeros, every counter is back at zero, and a second
    launch (another order of taking pieces on a GPU) gives the same output bit for bit."""
    from sparse_kernels import balanced_decode as bd

    monkeypatch.setattr(bd, "PIECES_PER_PROGRAM", pieces)
    seq_lens = [1, 77, 53, 0, 33, 300, 0]
    q, k, v, bt, sl = _setup(seq_lens, 4, 64, 16, torch.float32, "NHD", seed=21)
    want = _dense_ref(q, k, v, bt, sl)
    want[torch.tensor(seq_lens) == 0] = 0
    for programs in (1, 3, 40):
        ws = _poisoned_workspace(len(seq_lens), q, programs, pieces=pieces)
        out = torch.full_like(q, float("nan"))
        balanced_decode(q, k, v, bt, sl, out=out, workspace=ws, programs=programs, block_n=16,
                        inline_merge=inline)
        _close(out, want, torch.float32)
        _counters_reset(ws)
        again = balanced_decode(q, k, v, bt, sl, workspace=ws, programs=programs, block_n=16,
                                inline_merge=inline)
        assert torch.equal(again, out)
        _counters_reset(ws)


def test_workspace_segments_cover_the_pieces(monkeypatch):
    from sparse_kernels import balanced_decode as bd

    monkeypatch.setattr(bd, "_device_sms", lambda device: 132)
    assert bd.workspace_segments(16, 8, torch.device("cpu")) == 16 + 66 + 2
    monkeypatch.setattr(bd, "PIECES_PER_PROGRAM", 3)
    assert bd.workspace_segments(16, 8, torch.device("cpu")) == 16 + 3 * 66 + 2


def test_maxnreg_option(monkeypatch):
    """A register cap becomes the launch's ``maxnreg`` keyword, except at 0 and under the
    interpreter (whose launcher takes none)."""
    from sparse_kernels.tooling_env import maxnreg_option

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert maxnreg_option(128) == {"maxnreg": 128}
    assert maxnreg_option(0) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert maxnreg_option(128) == {}

"""sparse_kernels.launch: the key of a fast launch is at least as fine as Triton's
specialization, so a kept kernel is only reused for arguments Triton would specialize alike.
On the CPU only the key and the pass-through are testable; the launches themselves run in
the GPU tests (every decode kernel launches through the wrapper there)."""

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from sparse_kernels.launch import FastLaunch, fast_launch_enabled


def _body(x_ptr, y_ptr, n, stride, flag, scale, BLOCK: tl.constexpr, MODE: tl.constexpr = 0):
    pass


def _wrapper() -> FastLaunch:
    return FastLaunch(JITFunction(_body), enabled=True)


def test_key_separates_what_triton_specializes():
    f = _wrapper()
    x = torch.zeros(64, dtype=torch.float32)
    y = torch.zeros(64, dtype=torch.float32)
    base = f.key((x, y, 100, 1, True, 0.5), {"BLOCK": 16})
    assert base is not None
    same = f.key((torch.zeros(8), torch.ones(8), 99, 1, False, 2.0), {"BLOCK": 16})
    assert same == base  # same kinds: 99 and 100 are neither 1 nor multiples of 16
    assert f.key((x[1:], y, 100, 1, True, 0.5), {"BLOCK": 16}) != base  # unaligned pointer
    assert f.key((x.half(), y, 100, 1, True, 0.5), {"BLOCK": 16}) != base  # dtype
    assert f.key((x, y, 112, 1, True, 0.5), {"BLOCK": 16}) != base  # 16 divides it
    assert f.key((x, y, 100, 2, True, 0.5), {"BLOCK": 16}) != base  # 1 is specialized
    assert f.key((x, y, 2**40, 1, True, 0.5), {"BLOCK": 16}) != base  # int64
    assert f.key((x, y, 100, 1, 1, 0.5), {"BLOCK": 16}) != base  # bool vs int
    assert f.key((x, y, 100, 1, True, 0.5), {"BLOCK": 32}) != base  # constexpr value
    assert f.key((x, y, 100, 1, True, 0.5), {"BLOCK": 16, "num_warps": 8}) != base  # option
    assert f.key((x, y, 100, 1, True, None), {"BLOCK": 16}) != base  # None


def test_positional_constexpr_keys_by_value():
    f = _wrapper()
    x = torch.zeros(4)
    assert f.key((x, x, 3, 3, 0, 1.0, 16), {}) != f.key((x, x, 3, 3, 0, 1.0, 32), {})


def test_no_key_for_other_argument_types():
    f = _wrapper()
    x = torch.zeros(4)
    import numpy as np

    assert f.key((x, x, np.int64(3), 1, True, 0.5), {"BLOCK": 16}) is None
    assert f.key((x, x, 3, 1, True, 0.5), {"BLOCK": 16, "other": x}) is None
    assert f.key((x, x, 3, 1, True, 0.5), {"BLOCK": 16, "lst": [1]}) is None  # unhashable


def test_disabled_is_the_kernel_itself(monkeypatch):
    calls = []

    class Fn:
        params = []

        def __getitem__(self, grid):
            calls.append(grid)
            return lambda *a, **k: ("ran", a, k)

    f = FastLaunch(Fn(), enabled=False)
    assert f[(2,)](1, BLOCK=4) == ("ran", (1,), {"BLOCK": 4})
    assert calls == [(2,)] and f.hits == 0


def test_enabled_only_where_verified(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSE_SERVE_FAST_LAUNCH", "0")
    assert not fast_launch_enabled()
    monkeypatch.setenv("SPARSE_SERVE_FAST_LAUNCH", "1")
    assert fast_launch_enabled() == triton.__version__.startswith("3.6.")
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    assert not fast_launch_enabled()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fast_launch_enabled()


def test_launch_hooks_are_the_chains_contents():
    """Triton 3.6 keeps launch hooks in a HookChain that is never None: an empty chain is no
    hook (the fast path stays on; session 20 found it always off on the GPU because of this),
    a chain holding a hook or a plain callable is one (Triton's path)."""
    from triton import knobs

    from sparse_kernels.launch import _hooks_set

    saved = knobs.runtime.launch_enter_hook
    try:
        if hasattr(saved, "calls"):
            assert not saved.calls and not _hooks_set()
            saved.add(print)
            try:
                assert _hooks_set()
            finally:
                saved.remove(print)
            assert not _hooks_set()
        knobs.runtime.launch_enter_hook = print
        assert _hooks_set()
    finally:
        knobs.runtime.launch_enter_hook = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches need a GPU")
def test_kept_kernels_launch_like_triton():
    """On a GPU: the same kernel through the wrapper and through Triton agree, across
    arguments that change Triton's specialization; a new specialization compiles anew."""

    @triton.jit
    def _axpy(x_ptr, y_ptr, out_ptr, n, a, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, a * tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m),
                 mask=m)

    f = FastLaunch(_axpy, enabled=True)
    dev = torch.device("cuda")
    for n, off in ((1000, 0), (1024, 0), (1, 0), (999, 1), (1000, 0), (1024, 0), (999, 1)):
        buf = torch.randn(n + off + 1, device=dev)
        x, y = buf[off:off + n], torch.randn(n, device=dev)
        out, want = torch.empty_like(y), torch.empty_like(y)
        grid = (triton.cdiv(n, 128),)
        f[grid](x, y, out, n, 2.0, BLOCK=128)
        _axpy[grid](x, y, want, n, 2.0, BLOCK=128)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(out, 2.0 * x + y)
    assert f.hits == 3  # the repeats of (1000, 0), (1024, 0) and (999, 1)
    assert len(f._kernels) == 4  # 1000, 1024 (multiple of 16), 1 (specialized), unaligned

"""Kernel launches with less host time, for the steps an engine runs eagerly.

vLLM runs attention outside its CUDA graphs in every step with a prefill row, and a Triton
3.6 launch costs ~55 us of Python there (binding and specializing every argument, building the
cache key, the launcher's wrapper): with several launches per layer and 32 layers, that is the
step's time when its GPU work is short (``benchmarks/bench_host_overhead.py``). Inside a CUDA
graph it costs nothing, so only eager steps gain.

:func:`fast_launch` wraps a ``@triton.jit`` kernel. ``kernel[grid](*args, **kwargs)`` then
builds a key from the arguments that is at least as fine as Triton's specialization:

* a tensor: its dtype and whether its address is 16-byte aligned;
* an int: whether it equals 1, whether 16 divides it, and its integer width (i32, i64, u64);
* a bool, a float, ``None``: their kind;
* a constexpr parameter, and every keyword argument (constexprs and launch options): its value;
* the device of the first tensor.

The first launch under a key goes through Triton's own path (``JITFunction.run``: compile or
cache) and keeps the compiled kernel; later launches under that key call the compiled kernel
directly (``CompiledKernel[grid](*args)``, Triton's own launcher). Equal keys imply equal
Triton specializations, so the kept kernel is the one Triton would pick. Any other argument
type, a launch hook (profilers), a Triton version this was not verified on, the interpreter
(``TRITON_INTERPRET=1``) or ``SPARSE_SERVE_FAST_LAUNCH=0`` take Triton's path every time.
"""

from __future__ import annotations

import os

import torch
import triton

VERIFIED_TRITON = ("3.6.",)
_MISSING = object()


def fast_launch_enabled() -> bool:
    """Read at each wrapper's creation (module import): the switch, the version, the mode."""
    if os.environ.get("SPARSE_SERVE_FAST_LAUNCH", "1") in ("0", "false", "False"):
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return triton.__version__.startswith(VERIFIED_TRITON)


def _hooks_set() -> bool:
    """Whether a launch hook is installed (profilers): Triton 3.6 keeps them in a
    ``HookChain`` (never ``None``; installed hooks are in its ``calls``)."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except Exception:  # no knobs: be safe
        return True
    for h in hooks:
        if h is None:
            continue
        calls = getattr(h, "calls", None)
        if calls is None or calls:  # a plain callable, or a chain holding hooks
            return True
    return False


def _int_width(v: int) -> int:
    if -(2**31) <= v <= 2**31 - 1:
        return 32
    if 2**63 <= v <= 2**64 - 1:
        return 65  # u64
    return 64


class FastLaunch:
    """A ``@triton.jit`` kernel whose launches skip Triton's per-launch binding where the
    arguments' specialization was seen before (see the module docstring)."""

    def __init__(self, fn, enabled: bool | None = None):
        self.fn = fn
        self.enabled = fast_launch_enabled() if enabled is None else enabled
        params = getattr(fn, "params", None)
        if params is None:  # the interpreter's function: nothing to skip
            self.enabled = False
            params = []
        self._names = [p.name for p in params]
        self._constexpr = [p.is_constexpr for p in params]
        self._defaults = [p.default if p.has_default else _MISSING for p in params]
        self._kernels: dict = {}
        self.hits = 0  # launches that skipped Triton's path (tests, diagnostics)

    def __getattr__(self, name):  # everything else is the kernel's (e.g. .fn, .warmup)
        return getattr(self.__dict__["fn"], name)

    def __getitem__(self, grid):
        if not self.enabled:
            return self.fn[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def key(self, args: tuple, kwargs: dict):
        """The arguments' key, or ``None`` where one cannot be made (Triton's path)."""
        parts = []
        device = None
        constexpr = self._constexpr
        for i, a in enumerate(args):
            if i < len(constexpr) and constexpr[i]:
                parts.append(("c", a))
            elif isinstance(a, torch.Tensor):
                if device is None:
                    device = a.get_device()
                parts.append((a.dtype, a.data_ptr() % 16 == 0))
            elif a is None:
                parts.append(None)
            elif isinstance(a, bool):
                parts.append("b")
            elif isinstance(a, int):
                parts.append((a == 1, a % 16 == 0, _int_width(a)))
            elif isinstance(a, float):
                parts.append("f")
            else:
                return None
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                return None
            parts.append((k, v))
        parts.append(device)
        key = tuple(parts)
        try:
            hash(key)
        except TypeError:  # an unhashable value
            return None
        return key

    def _launch(self, grid, args: tuple, kwargs: dict):
        key = self.key(args, kwargs)
        kernel = None if key is None else self._kernels.get(key)
        if kernel is None or _hooks_set() or getattr(self.fn, "pre_run_hooks", None):
            kernel = self.fn[grid](*args, **kwargs)
            if key is not None and kernel is not None:
                self._kernels[key] = kernel
            return kernel
        full = list(args)
        for i in range(len(args), len(self._names)):
            v = kwargs.get(self._names[i], self._defaults[i])
            if v is _MISSING:  # Triton's path says which argument is missing
                return self.fn[grid](*args, **kwargs)
            full.append(v)
        if len(grid) < 3:
            grid = tuple(grid) + (1,) * (3 - len(grid))
        kernel[grid](*full)
        self.hits += 1
        return kernel


def fast_launch(fn) -> FastLaunch:
    return FastLaunch(fn)


__all__ = ["FastLaunch", "VERIFIED_TRITON", "fast_launch", "fast_launch_enabled"]

"""Integer helpers for host code that picks launch sizes.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in Triton 3.6:
a call from host code goes through their argument unwrapping and costs microseconds, paid per
launch and per layer in every eager step (vLLM runs attention eagerly outside pure-decode CUDA
graphs). Kernels keep using ``tl.cdiv``; host code uses these.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n``; 0 for ``n <= 0`` (as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


__all__ = ["cdiv", "next_power_of_2"]

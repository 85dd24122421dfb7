"""Host-side integer helpers agree with Triton's constexpr functions they replace."""

import triton

from sparse_kernels.host_math import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 4100)) + [2**20 - 1, 2**20, 2**20 + 1, 131072, 2**31 + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for x in range(0, 300):
        for y in (1, 2, 3, 16, 64, 1024):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)

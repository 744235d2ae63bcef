"""The persistent GEMM (`ops.triton_gemm`): any number of programs covers every output tile exactly once, so the
result is `x @ weight.T` whatever the partition size (Triton's interpreter on the CPU, fp32 in IEEE precision)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.triton_interpreter import AVAILABLE

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="triton is not installed")


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 70), num_sms=st.integers(1, 40))
def test_any_partition_size_gives_the_matmul(m: int, n: int, k: int, num_sms: int) -> None:
    """Shapes off the 32-tile grid (masked edges), grids from one program (it loops over every tile) to more
    programs than tiles (the grid is cut to the tile count)."""
    from nanoflow_fx.ops.triton_gemm import persistent_linear

    gen = torch.Generator().manual_seed(m * 10_000 + n * 100 + k)
    x, weight = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    torch.testing.assert_close(persistent_linear(x, weight, num_sms), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_a_group_of_tile_rows_is_visited_in_order_and_bad_input_is_named() -> None:
    """GROUP_M=2 over 3 rows of tiles (the last group has one row) and 2 programs; strided (transposed) input."""
    from nanoflow_fx.ops.triton_gemm import persistent_linear

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(40, 96, generator=gen).T, torch.randn(33, 40, generator=gen)  # x: [96, 40], strided
    got = persistent_linear(x, weight, 2, block_m=32, block_n=16, block_k=16, group_m=2)
    torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        persistent_linear(x, weight.T)
    with pytest.raises(ValueError, match="one dtype"):
        persistent_linear(x, weight.double())
    with pytest.raises(ValueError, match="num_sms >= 1"):
        persistent_linear(x, weight, 0)

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


def test_partitioned_gemms_take_the_matmuls_issued_inside_and_nothing_outside() -> None:
    """F.linear with and without bias (aten.mm / addmm at the dispatcher), `mm(out=)`; other ops untouched."""
    from nanoflow_fx.ops.triton_gemm import partitioned_gemms

    gen = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(9, 20, generator=gen), torch.randn(13, 20, generator=gen), torch.randn(13)
    out = torch.empty(9, 13)
    with partitioned_gemms(3) as mode:
        plain = torch.nn.functional.linear(x, weight)
        biased = torch.nn.functional.linear(x, weight, bias)
        torch.mm(x, weight.T, out=out)
        summed = x.sum()
        added = torch.add(x, 1.0, out=torch.empty_like(x))  # another op with out=: untouched
    assert mode is not None and mode.calls == 3
    torch.testing.assert_close(plain, x @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(biased, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summed, x.sum())
    torch.testing.assert_close(added, x + 1.0)
    with partitioned_gemms(0) as none:
        torch.nn.functional.linear(x, weight)
    assert none is None and mode.calls == 3


def test_a_nanobatched_step_on_partitioned_gemms_equals_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units with `gemm_sms` (the "hard-triton" compute unit): the step's matmuls run on the persistent GEMM, and
    the split step's logits are the plain split step's (fp32)."""
    import dataclasses

    from nanoflow_fx.ops import triton_gemm
    from nanoflow_fx.runtime.program_runner import Units
    from tests.test_streams import two_nanobatch_probe

    model, program, args, plain = two_nanobatch_probe()
    want = program.run_nanobatched(args, plain)
    shapes: list[tuple[int, int]] = []
    original = triton_gemm.persistent_linear

    def counting(x, weight, num_sms=None, out=None, **launch):  # type: ignore[no-untyped-def]
        assert num_sms == 3
        shapes.append((x.shape[0], weight.shape[0]))
        return original(x, weight, num_sms, out, **launch)

    monkeypatch.setattr(triton_gemm, "persistent_linear", counting)
    got = program.run_nanobatched(args, dataclasses.replace(plain, units=Units({}, gemm_sms=3)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Every matmul went to the persistent GEMM. Fused linears: per layer qkv, o, gate_up, down. Each nano-batch (5
    # tokens, then the other 12) runs every layer's qkv and, but for the last layer's, its o / gate_up / down; the
    # piece after the last attention call (the last layer's o / gate_up / down, the final norm, the logits rows,
    # the LM head) mixes tokens and runs once on all 17 tokens: 3 more, and the LM head on the 2 logits rows.
    layers, tokens = model.config.num_hidden_layers, plain.boundaries[2]
    assert len(shapes) == 2 * (layers + 3 * (layers - 1)) + 4
    assert sorted({rows for rows, _ in shapes}) == [2, 5, tokens - 5, tokens]

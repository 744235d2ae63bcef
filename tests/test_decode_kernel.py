"""The memory unit's decode kernel (`DecodeKernel`), on the CPU: a nano-batched step whose units name one attends
with it (launch options passed through) and computes what the step's own backend computes; FlashInfer's planned
run gives it the decode rows only (their request tables cut, as views) and the rest to its prefill kernel; the
search tries it only on the SM shares it was measured fastest for, and `best_decode_kernels` picks per share."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanoflow_fx.cost.model import Candidate, DecodeTiming, best_decode_kernels, candidates, policy_for
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, DecodeKernel, get, register
from nanoflow_fx.runtime.program_runner import Units


class Spy(AttentionBackend):
    """The torch reference kernel, noting each call's row count and launch options."""

    name = "spy_decode"

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def run(self, q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, scaling, sliding_window,
            softcap, kv_scale=None, **launch):  # type: ignore[no-untyped-def]
        self.calls.append((q.shape[0], launch))
        return get("torch").run(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, scaling,
                                sliding_window, softcap, kv_scale)


SPY = register(Spy())


def test_a_nanobatched_step_attends_with_the_units_decode_kernel() -> None:
    from tests.test_streams import two_nanobatch_probe

    model, program, args, plain = two_nanobatch_probe()
    want = program.run_nanobatched(args, plain)
    SPY.calls.clear()
    kernel = DecodeKernel(SPY.name, (("block_n", 32), ("num_stages", 7)))
    got = program.run_nanobatched(args, dataclasses.replace(plain, units=Units({}, decode=kernel)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layers = model.config.num_hidden_layers
    bounds = plain.boundaries
    sizes = (bounds[1], bounds[2] - bounds[1])
    assert SPY.calls == [(n, {"block_n": 32, "num_stages": 7}) for _ in range(layers) for n in sizes]
    SPY.calls.clear()
    program.run_nanobatched(args, dataclasses.replace(plain, units=Units({})))
    assert SPY.calls == []  # no decode kernel named: the step's own backend


class FakeWrapper:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def run(self, q, kv_cache, out=None):  # type: ignore[no-untyped-def]
        self.log.append((self.name, q.shape[0]))
        result = torch.full_like(q, 2.0 if self.name == "prefill" else 1.0)
        if out is not None:
            out.copy_(result)
            return out
        return result


@pytest.mark.parametrize("num_decode, tokens", [(3, 10), (4, 4), (0, 6)])
def test_flashinfer_gives_a_decode_kernel_the_decode_rows_only(num_decode: int, tokens: int) -> None:
    """Decode rows to the kernel with their request tables cut to them (views of the nano-batch's), prefill rows
    to the planned prefill wrapper, one output; no decode rows: the kernel is not called."""
    from nanoflow_fx.ops.flashinfer_attention import _Plans, _run

    log: list = []
    prefill = FakeWrapper(log, "prefill") if num_decode < tokens else None
    plans = _Plans(FakeWrapper(log, "decode"), prefill, num_decode)
    requests = num_decode + (1 if num_decode < tokens else 0)
    qo = torch.tensor([*range(num_decode + 1), tokens][:requests + 1], dtype=torch.int32)
    kv_ptr = torch.arange(requests + 1, dtype=torch.int32) * 2
    kv_indices = torch.arange(2 * requests, dtype=torch.int32)
    last = torch.full((requests,), 5, dtype=torch.int32)
    seen = []

    class Kernel(DecodeKernel):
        def run(self, q, kv_cache, metadata, config, kv_scale=None):  # type: ignore[no-untyped-def]
            seen.append((q.shape[0], [m.tolist() for m in metadata]))
            return torch.full_like(q, 3.0)

    config = AttentionConfig(4, 2, 8, 0.35, 0, 0.0)
    q = torch.zeros(tokens, 4, 8)
    out = _run(plans, config, q, torch.zeros(3, 2, 16, 2, 8), (qo, kv_ptr, kv_indices, last), Kernel("k"))
    expect = torch.tensor([3.0] * num_decode + [2.0] * (tokens - num_decode))
    assert torch.equal(out[:, 0, 0], expect)
    if num_decode:
        assert seen == [(num_decode, [list(range(num_decode + 1)), kv_ptr[: num_decode + 1].tolist(),
                                      kv_indices.tolist(), [5] * num_decode])]
    else:
        assert seen == []
    assert log == ([("prefill", tokens - num_decode)] if num_decode < tokens else [])


def test_the_search_tries_a_decode_kernel_on_the_shares_it_won() -> None:
    kernel = DecodeKernel("triton", (("num_stages", 7),))
    space = candidates((16, 32), fractions=(0.5,), modes=("soft",), decode={32: kernel, 16: None})
    with_kernel = [c for c in space if c.decode is not None]
    assert with_kernel == [Candidate((0.5,), False, "soft", 32, kernel), Candidate((), True, "soft", 32, kernel)]
    assert "[triton num_stages=7]" in with_kernel[0].label()
    units = policy_for(with_kernel[0], lambda mode, sms: Units({}, carveout=sms))(100, 40)
    assert units is not None and units.units == Units({}, 32, kernel)
    assert policy_for(Candidate((0.5,), False, "soft", 32), lambda mode, sms: Units({}))(100, 40).units.decode is None


def test_best_decode_kernels_picks_the_fastest_per_share() -> None:
    a, b = DecodeKernel("triton", (("num_stages", 3),)), DecodeKernel("triton", (("num_stages", 7),))
    timings = [DecodeTiming(16, None, 2.0, 1.0), DecodeTiming(16, a, 1.5, 1.3), DecodeTiming(16, b, 1.2, 1.6),
               DecodeTiming(132, None, 0.5, 3.0), DecodeTiming(132, a, 0.6, 2.9), DecodeTiming(132, b, 0.55, 2.95)]
    assert best_decode_kernels(timings) == {16: b, 132: None}


def test_auto_keeps_the_backends_decode_kernel_where_partitions_cannot_be_timed(monkeypatch, caplog) -> None:
    """`num_nanobatches="auto"`'s decode-kernel timings on a device without SM partitions (here: the timing raises,
    as `green_context.split_sms` does where the driver cannot split): a warning, no timings, no decode kernel."""
    from nanoflow_fx.cost import autotune as opt
    from nanoflow_fx.cost.model import StepShape
    from tests.conftest import DEFAULT_CONFIG, optimized

    runtime = optimized("llama", DEFAULT_CONFIG).nanoflow
    mixed = StepShape(2, 8, 6)
    assert opt._time_decode_kernels(runtime, 256, mixed, (32,)) == []  # fp32 on the CPU: no half variant

    def no_partitions(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("cuDevSmResourceSplitByCount failed")

    monkeypatch.setattr(runtime.kv_cache, "model_dtype", torch.bfloat16)  # (read, not used)
    monkeypatch.setattr(opt.attention_backends, "stand_in", lambda name, configs, dtype, device, kv_dtype: get(name))
    monkeypatch.setattr(opt, "decode_kernel_timings", no_partitions)
    with caplog.at_level("WARNING"):
        assert opt._time_decode_kernels(runtime, 256, mixed, (32,)) == []
    assert "timing decode kernels on SM partitions failed" in caplog.text
    assert best_decode_kernels([]) == {}

"""The stream plan of a Schedule (pure logic, CPU) and the multi-stream executor on CUDA (`pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from nanoflow_fx.runtime.streams import stream_actions
from nanoflow_fx.schedule import Schedule
from nanoflow_fx.schedule.builders import nanoflow_pingpong, sequential, split_4_2


def _check_plan(schedule: Schedule) -> None:
    """Issuing the actions in list order on in-order streams honours every dependency of the schedule."""
    ops = {op.key: op for op in schedule.ops}
    actions = stream_actions(schedule)
    assert sorted(a.key for a in actions) == sorted(ops)
    issued: dict[str, list] = {unit: [] for unit in schedule.units}
    recorded: set = set()
    position = {}
    for i, action in enumerate(actions):
        op = ops[action.key]
        assert action.unit == op.unit
        for wait in op.waits:  # every dependency: an event of another unit, or earlier on the same stream
            if ops[wait].unit == op.unit:
                assert wait in position and wait not in action.waits
            else:
                assert wait in action.waits and wait in recorded, f"{action.key} waits on unrecorded {wait}"
        issued[op.unit].append(action.key)
        position[action.key] = i
        if action.record:
            recorded.add(action.key)
    for unit in schedule.units:  # each stream runs its unit's nano-ops in the schedule's program order
        assert issued[unit] == [op.key for op in schedule.ops if op.unit == unit]
    waited = {w for a in actions for w in a.waits}
    assert {a.key for a in actions if a.record} == waited  # an event exactly where another unit waits


@pytest.mark.parametrize("build", [sequential, nanoflow_pingpong, split_4_2])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_stream_plan_honours_every_dependency(build, num_layers: int) -> None:
    _check_plan(build(num_layers, 1024))


def test_stream_plan_of_a_captured_model_schedule() -> None:
    """The schedule the passes build for a real captured step (2 nano-batches, Llama and Gemma2)."""
    from tests.conftest import DEFAULT_CONFIG, optimized

    for family in ("llama", "gemma2"):
        model = optimized(family, DEFAULT_CONFIG)
        from nanoflow_fx.runtime.nanobatch import NanobatchRunner

        gm = model.nanoflow.step_fn.graphs[-1]
        runner = NanobatchRunner(gm, 2)
        _check_plan(runner.scheduled(16).schedule)
        _check_plan(runner.scheduled(7).schedule)


@pytest.mark.cuda
@pytest.mark.parametrize("partition", ["streams", "soft", "hard"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_multi_stream_generation_equals_one_stream(family: str, partition: str) -> None:
    """2 nano-batches on one stream per unit (plain, soft- or hard-partitioned): the tokens of the single-stream
    run, which equal HF's (fp32 parity tests)."""
    import dataclasses

    from tests.conftest import DEFAULT_CONFIG, optimized
    from tests.test_generate_parity import _left_padded_batch

    one = dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2, cuda_graphs=False)
    multi = dataclasses.replace(one, sm_partition=partition)
    ids, mask = (t.cuda() for t in _left_padded_batch([3, 12, 7, 9]))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = optimized(family, one, device="cuda").generate(ids, **kwargs)
    model = optimized(family, multi, device="cuda")
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    runners = [gm.meta["nanoflow_runner"] for gm in model.nanoflow.step_fn.graphs if "nanoflow_runner" in gm.meta]
    assert any(r._cuda_executors for r in runners)  # the multi-stream executor ran


@pytest.mark.cuda
def test_sm_partitions_are_disjoint_multiples_of_8() -> None:
    from nanoflow_fx.runtime.green_context import split_sms

    total = torch.cuda.get_device_properties(0).multi_processor_count
    memory, rest = split_sms(20)
    assert memory.num_sms == 24 and memory.num_sms + rest.num_sms <= total

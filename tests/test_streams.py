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
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("partition", ["streams", "soft", "hard"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_multi_stream_generation_equals_one_stream(family: str, partition: str, graphs: bool) -> None:
    """2 nano-batches on one stream per unit (plain, soft- or hard-partitioned), eagerly or replayed as CUDA
    graphs (fork/join captured): the tokens of the single-stream run, which equal HF's (fp32 parity tests)."""
    import dataclasses

    from tests.conftest import DEFAULT_CONFIG, optimized
    from tests.test_generate_parity import _left_padded_batch

    one = dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2, cuda_graphs=False)
    multi = dataclasses.replace(one, sm_partition=partition, cuda_graphs=graphs)
    ids, mask = (t.cuda() for t in _left_padded_batch([3, 12, 7, 9]))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = optimized(family, one, device="cuda").generate(ids, **kwargs)
    model = optimized(family, multi, device="cuda")
    if graphs and family != "mixtral":  # fp32 MoE syncs in HF's grouped-mm fallback: capture gives up (logged)
        assert model.nanoflow.engine.cuda_graphs is not None, model.nanoflow.engine.cuda_graphs_off_reason
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_padded_host_split_metadata_gives_the_unsplit_step(device: str) -> None:
    """A nano-batched step fed split metadata computed on the host and padded to a bucket's fixed sizes (what a
    CUDA graph of a nano-batched step reads) computes the logits of the unsplit step."""
    import dataclasses

    from nanoflow_fx.runtime import Chunk
    from nanoflow_fx.runtime.batch import StepShape, build_step
    from tests.conftest import DEFAULT_CONFIG, optimized

    plain_model = optimized("llama", DEFAULT_CONFIG, device=device)
    split_model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2), device=device)
    outputs = []
    for model, nanobatched in ((plain_model, False), (split_model, True)):
        engine, ctx = model.nanoflow.engine, model.nanoflow.step_context
        requests = engine.admit([[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]], max_new_tokens=1)
        try:
            chunks = [Chunk(requests[0], 5), Chunk(requests[1], 3), Chunk(requests[2], 7)]
            cache = engine.kv_cache
            shape = StepShape(tokens=24, requests=9, pages=cache.allocator.num_pages + 6, logits=12)
            step = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, engine.device, True,
                              backend=engine.attention_backend, shape=shape)
            args = (step.input_ids, step.position_ids, step.logits_indices, step.metadata)
            if nanobatched:  # compile once (creates the runner), then run on padded static split metadata
                ctx.host = tuple(t.cpu() for t in step.metadata.tensors()[:4])
                model.nanoflow.step_fn(*args)
                plan = ctx.runner.plan_for(24)
                static = ctx.runner.host_split(plan, ctx.host, cache.page_size, pad=(9, shape.pages))
                assert all(t.shape[0] in (10, 9, shape.pages) for t in static)
                ctx.host, ctx.static = None, [t.to(engine.device) for t in static]
                try:
                    outputs.append(model.nanoflow.step_fn(*args)[: step.num_logits])
                finally:
                    ctx.static = None
            else:
                outputs.append(model.nanoflow.step_fn(*args)[: step.num_logits])
        finally:
            engine.release(requests)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)

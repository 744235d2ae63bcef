"""The stream plan of a Schedule (pure logic, CPU) and the multi-stream executor on CUDA (`pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from nanoflow_fx.config import ExperimentalConfig
from nanoflow_fx.runtime.streams import stream_actions
from nanoflow_fx.schedule import Schedule
from tests.schedules import nanoflow_pingpong, sequential, split_4_2
from tests.steps import program_runners


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
        from nanoflow_fx.runtime.program_runner import program_schedule

        program = model.nanoflow.step_fn.program
        _check_plan(program_schedule(program, (0, 8, 16)))
        _check_plan(program_schedule(program, (0, 3, 7), attention=(0, 1, 5, 7)))


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True, "split"])
@pytest.mark.parametrize("partition", ["streams", "soft", "carveout", "hard"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_multi_stream_generation_equals_one_stream(family: str, partition: str, graphs: bool | str) -> None:
    """2 nano-batches on one stream per unit (plain, soft-partitioned, with the GEMMs' SM carve-out, or
    hard-partitioned), decode steps eager, replayed as whole CUDA graphs, or replayed as graphs captured cut in
    two ("split": the units fork and join inside each capture): the tokens of the single-stream run, which equal
    HF's (fp32 parity tests)."""
    import dataclasses

    import nanoflow_fx
    from tests.conftest import DEFAULT_CONFIG, optimized
    from tests.test_generate_parity import _left_padded_batch

    if graphs == "split" and family == "mixtral":
        pytest.skip("fp32 MoE syncs in HF's grouped-mm fallback: no CUDA graphs to cut")
    one = dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2, cuda_graphs=False)
    experimental = ExperimentalConfig(sm_partition=partition, split_decode_graphs=graphs == "split")
    multi = dataclasses.replace(one, experimental=experimental, cuda_graphs=bool(graphs))
    ids, mask = (t.cuda() for t in _left_padded_batch([3, 12, 7, 9]))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = optimized(family, one, device="cuda").generate(ids, **kwargs)
    model = optimized(family, multi, device="cuda")
    runner = model.nanoflow.runner
    if graphs and family != "mixtral":  # fp32 MoE syncs in HF's grouped-mm fallback: capture gives up (logged)
        assert runner.cuda_graphs is not None, runner.cuda_graphs_off_reason
        cut = {shape.tokens: g.nanobatches is not None for shape, g in runner.cuda_graphs.graphs.items()}
        assert all(cut.values()) if graphs == "split" else not any(cut.values()), cut
        shown = nanoflow_fx.explain(model).graphs
        assert shown.startswith("decode buckets cut at" if graphs == "split" else "decode buckets"), shown
        before = runner.stats["graph_steps"]
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    if graphs and family != "mixtral":
        assert runner.stats["graph_steps"] > before  # the decode steps did replay the (cut) graphs
    runners = program_runners(model)
    assert any(r.last_schedule is not None and r.last_schedule.units == ("compute", "memory") for r in runners)


@pytest.mark.cuda
def test_sm_partitions_are_disjoint_multiples_of_8() -> None:
    from nanoflow_fx.runtime.green_context import split_sms

    total = torch.cuda.get_device_properties(0).multi_processor_count
    memory, rest = split_sms(20)
    assert memory.num_sms == 24 and memory.num_sms + rest.num_sms <= total


def test_padded_split_metadata_is_the_unpadded_split_plus_empty_entries() -> None:
    """pad=(requests, pages): every nano-batch's table is the unpadded one followed by empty requests (no queries,
    no pages) and unused page ids, at exactly the fixed sizes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nanoflow_fx.ops.split_metadata import split_attention_metadata

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def check(data) -> None:
        page = data.draw(st.integers(1, 5))
        num_requests = data.draw(st.integers(1, 5))
        qo, kvp, kvi, last, next_page = [0], [0], [], [], 0
        for _ in range(num_requests):
            q = data.draw(st.integers(1, 6))
            cached = data.draw(st.integers(0, 9))
            kv = cached + q
            pages = -(-kv // page)
            qo.append(qo[-1] + q)
            kvi += list(range(next_page, next_page + pages))
            next_page += pages
            kvp.append(len(kvi))
            last.append(kv - (pages - 1) * page)
        tokens = qo[-1]
        cuts = sorted(data.draw(st.sets(st.integers(1, tokens - 1), max_size=3))) if tokens > 1 else []
        boundaries = (0, *cuts, tokens)
        metadata = [torch.tensor(v, dtype=torch.int32) for v in (qo, kvp, kvi, last)]
        pad = (num_requests + data.draw(st.integers(0, 3)), len(kvi) + data.draw(st.integers(0, 4)))
        plain = split_attention_metadata(*metadata, page, boundaries)
        padded = split_attention_metadata(*metadata, page, boundaries, pad=pad)
        for (p_qo, p_kvp, p_kvi, p_last), (q_qo, q_kvp, q_kvi, q_last) in zip(plain, padded):
            n = p_last.shape[0]
            assert q_qo.shape[0] == pad[0] + 1 and q_kvp.shape[0] == pad[0] + 1 and q_last.shape[0] == pad[0]
            assert q_kvi.shape[0] == pad[1]
            assert torch.equal(q_qo[: n + 1], p_qo) and torch.equal(q_kvp[: n + 1], p_kvp)
            assert torch.equal(q_last[:n], p_last) and torch.equal(q_kvi[: p_kvi.shape[0]], p_kvi)
            assert bool((q_qo[n:] == p_qo[-1]).all()) and bool((q_kvp[n:] == p_kvp[-1]).all())
        # A pair per nano-batch (a CUDA graph's nano-batches of their own sizes), and a replay's tables: requests
        # padded, the page list left at its length (it fills the front of the static buffer)
        own = [(p[3].shape[0] + data.draw(st.integers(0, 2)), len(kvi) + 1) for p in plain]
        sized = split_attention_metadata(*metadata, page, boundaries, pad=own)
        replay = split_attention_metadata(*metadata, page, boundaries, pad=own, pad_pages=False)
        for (_, _, p_kvi, _), (rows, pages), s_part, r_part in zip(plain, own, sized, replay):
            assert s_part[3].shape[0] == rows and s_part[2].shape[0] == pages
            assert torch.equal(s_part[0], r_part[0]) and torch.equal(s_part[1], r_part[1])
            assert torch.equal(s_part[3], r_part[3]) and torch.equal(r_part[2], p_kvi)
            assert torch.equal(s_part[2][: p_kvi.shape[0]], r_part[2])
            assert int(r_part[1][-1]) == r_part[2].shape[0]  # every entry a request reads lies in the front
        with pytest.raises(ValueError, match="pads for"):
            split_attention_metadata(*metadata, page, boundaries, pad=own + [(1, 1)])

    check()


def test_program_runner_issues_the_stream_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nano-batched program's CUDA calls, recorded through stand-ins for torch's streams and events on the
    CPU: fork from the current stream, each piece of each nano-batch on its unit's stream after waiting on the
    events of its cross-unit dependencies (recorded right after those ran), join, and the logits of the one-stream
    run of the same cut."""
    import dataclasses

    from nanoflow_fx.runtime import program_runner
    from nanoflow_fx.runtime.program_runner import ProgramRunner, Units

    log: list[tuple] = []
    current = ["main"]

    class FakeEvent:
        count = 0

        def __init__(self) -> None:
            FakeEvent.count += 1
            self.name = f"e{FakeEvent.count}"

        def record(self, stream) -> None:
            log.append(("record", stream.name, self.name))

    class FakeStream:
        def __init__(self, name: str = "side") -> None:
            self.name = name

        def wait_event(self, event: FakeEvent) -> None:
            log.append(("wait", self.name, event.name))

        def wait_stream(self, other) -> None:
            log.append(("wait_stream", self.name, other.name))

    class StreamContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            self.saved = current[0]
            current[0] = self.stream.name

        def __exit__(self, *exc) -> None:
            current[0] = self.saved

    _, program, args, one_stream = two_nanobatch_probe()
    units = {u: FakeStream(u) for u in ("compute", "memory")}
    on_units = dataclasses.replace(one_stream, units=Units(units))
    want = program.run_nanobatched(args, one_stream)

    monkeypatch.setattr(program_runner.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(program_runner.torch.cuda, "current_stream", lambda: FakeStream("main"))
    monkeypatch.setattr(program_runner.torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(ProgramRunner, "_on_cuda", staticmethod(lambda args: True))
    run_op = ProgramRunner._run_op

    def traced(self, name, i, state, record):  # note which stream each nano-op ran on
        log.append(("run", current[0], (name, i)))
        return run_op(self, name, i, state, record)

    monkeypatch.setattr(ProgramRunner, "_run_op", traced)
    got = program.run_nanobatched(args, on_units)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    schedule = program.last_schedule
    ops = {op.key: op for op in schedule.ops}
    assert log[0][:2] == ("record", "main")
    fork = log[0][2]
    assert {(e[1], e[2]) for e in log[1:3]} == {("compute", fork), ("memory", fork)}
    event_of, position = {}, {}
    for i, entry in enumerate(log):
        if entry[0] == "run":
            key = entry[2]
            assert entry[1] == ops[key].unit  # on its unit's stream
            position[key] = i
            for wait in ops[key].waits:  # cross-unit: waited on the event recorded after `wait` ran
                assert ("wait", ops[key].unit, event_of[wait]) in log[:i]
        if entry[0] == "record" and entry[1] != "main":
            event_of[next(e for e in reversed(log[:i]) if e[0] == "run")[2]] = entry[2]
    assert set(position) == set(ops)
    assert {(e[1], e[2]) for e in log if e[0] == "wait_stream"} == {("main", "compute"), ("main", "memory")}
    assert any(op.unit == "memory" for op in schedule.ops) and any(op.waits for op in schedule.ops)


def two_nanobatch_probe():  # type: ignore[no-untyped-def]
    """A 2-nano-batch Llama program (CPU), its inputs for a two-prompt step, and a one-stream record cutting that
    step after 5 of its tokens (each nano-batch with its own metadata; no plans: the torch backend)."""
    import dataclasses

    from nanoflow_fx.ops.split_metadata import split_attention_metadata
    from nanoflow_fx.runtime.program_runner import NanobatchStep
    from tests.conftest import DEFAULT_CONFIG, optimized

    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    program = program_runners(model)[0]
    args = _probe_args(model, program)
    names = program.program.placeholders
    call = next(p.call for p in program.program.pieces if p.kind == "attention")
    host = [args[names.index(m)] for m in call.metadata]
    boundaries = (0, 5, args[names.index(call.slot_mapping)].shape[0])  # 16 prompt tokens (+ padding)
    metadata = tuple(split_attention_metadata(*host, model.nanoflow.kv_cache.page_size, boundaries))
    return model, program, args, NanobatchStep(boundaries, metadata, (None, None))


def _probe_args(model, program) -> list:
    """Real inputs for the captured program (its placeholders' order), recorded while the step runs once."""
    seen: list = []
    original = type(program).__call__

    def record(self, *args):
        seen[:] = args
        return original(self, *args)

    try:
        type(program).__call__ = record
        model.nanoflow.runner.run_prompts([[5] * 9, [6] * 7])
    finally:
        type(program).__call__ = original
    assert seen
    return list(seen)


def test_program_runner_evaluates_each_symbolic_size_once_per_step_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes that depend on the token count are re-evaluated per nano-batch through sympy (about 1 ms a call, on the
    host, every step): the runner keeps each value, so a second step of the same shape evaluates none, and gives
    the same logits."""
    import sympy

    _, program, args, record = two_nanobatch_probe()
    program._sizes.clear()
    calls = []
    subs = sympy.Basic.subs
    monkeypatch.setattr(sympy.Basic, "subs", lambda self, *a, **k: calls.append(1) or subs(self, *a, **k))
    first = program.run_nanobatched(args, record)
    evaluated = len(calls)
    second = program.run_nanobatched(args, record)
    assert evaluated > 0 and len(calls) == evaluated
    torch.testing.assert_close(second, first, rtol=0, atol=0)

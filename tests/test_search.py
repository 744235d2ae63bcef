"""The schedule search, pure given measurements: deterministic picks, never slower than unsplit; the program's
Schedule for any cut is valid."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow_fx.cost.model import UNSPLIT, Candidate, StepShape, TunedPolicy, candidates, pick
from nanoflow_fx.runtime.program_runner import Units
from tests.steps import program_runners
from tests.test_cost_tables import KINDS

SPACE = candidates()


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.floats(1.0, 100.0), min_size=len(SPACE), max_size=len(SPACE)))
def test_pick_is_the_fastest_unless_unsplit_is_within_the_margin(times: list[float]) -> None:
    measured = dict(zip(SPACE, times))
    chosen = pick(measured, margin=0.01)
    assert measured[chosen] <= measured[UNSPLIT]  # never slower than one nano-batch
    best = min(measured.values())
    if best < measured[UNSPLIT] * 0.99:
        assert measured[chosen] == best
    else:
        assert chosen == UNSPLIT
    assert pick(dict(reversed(list(measured.items()))), margin=0.01) in {chosen} | {
        c for c, t in measured.items() if t == measured[chosen]}  # deterministic up to exact ties


def test_pick_finds_the_known_optimum_of_a_synthetic_table() -> None:
    # A table in which attention on 32 SMs with the carve-out, cut at the decode rows, is 20% faster.
    optimum = Candidate((), True, "carveout", 32)
    measured = {c: 40.0 + (c.memory_sms / 100) for c in SPACE}
    measured[optimum] = 32.0
    assert optimum in SPACE and pick(measured) == optimum
    measured = {c: 40.0 for c in SPACE}  # nothing wins: unsplit
    assert pick(measured) == UNSPLIT


def test_candidates_cut_where_they_say() -> None:
    assert UNSPLIT.boundaries(1056, 288) is None
    assert Candidate((0.5,)).boundaries(1056, 288) == (0, 528, 1056)
    assert Candidate((), True).boundaries(1056, 288) == (0, 288, 1056)
    assert Candidate((), True).boundaries(256, 256) is None  # decode-only: nothing to cut at


def test_tuned_policy_cuts_like_the_nearest_shape_and_never_cuts_decode_only_steps() -> None:
    made: list[tuple[str, int]] = []

    def make_units(mode: str, sms: int) -> Units:
        made.append((mode, sms))
        return Units({})

    balanced, prefill = StepShape(288, 1280, 768), StepShape(0, 0, 2048)
    policy = TunedPolicy({balanced: Candidate((), True, "soft", 32), prefill: UNSPLIT}, make_units)
    cut = policy(1000, 300)
    assert cut is not None and cut.boundaries == (0, 300, 1000)
    assert policy(2048, 0) is None  # nearest is the prefill shape: unsplit
    assert policy(256, 256) is None and policy(257, 256) is None  # decode-only (+ one padding token)
    policy(1056, 288)
    assert made == [("soft", 32)]  # units made once per (mode, share)


def test_program_schedule_of_any_cut_is_valid() -> None:
    import dataclasses

    from nanoflow_fx.runtime.program_runner import program_schedule
    from nanoflow_fx.schedule import validate
    from tests.conftest import DEFAULT_CONFIG, optimized

    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    program = model.nanoflow.step_fn.program
    for boundaries in ((0, 1, 9), (0, 3, 6, 9), (0, 2, 4, 6, 9)):
        for one_unit in (False, True):
            schedule = program_schedule(program, boundaries, one_unit)
            validate(schedule)
            pieces = {p.name: p for p in program.pieces}
            for op in schedule.ops:  # whole pieces once, the others once per nano-batch
                assert op.nanobatch < (1 if pieces[op.group].whole else len(boundaries) - 1)
            assert len(schedule.ops) == sum(1 if p.whole else len(boundaries) - 1 for p in program.pieces)


def test_search_shapes_fit_the_budget_the_slots_and_the_cache() -> None:
    import dataclasses

    from nanoflow_fx.cost.autotune import search_shapes
    from tests.conftest import DEFAULT_CONFIG

    config = dataclasses.replace(DEFAULT_CONFIG, max_num_tokens=2048, max_batch_size=512, max_seq_len=4096,
                                 page_size=16)
    mixed, prefill = search_shapes(config, free_pages=60000)
    assert (mixed.decodes, mixed.context, mixed.tokens) == (512 - 1, 1024, 2048)  # the slots bound the decodes
    assert prefill == StepShape(0, 0, 2048)
    mixed, _ = search_shapes(config, free_pages=10000)  # 80% of the pages, less the prefill's, at 64 pages each
    assert mixed.decodes == (8000 - 128) // 64 and mixed.tokens == 2048
    assert search_shapes(config, free_pages=100) == [StepShape(0, 0, 2048)]  # no room for decodes
    # A chunk is one request's: never longer than max_seq_len, even when the budget is (the step is smaller then).
    short = dataclasses.replace(config, max_num_tokens=256, max_batch_size=16, max_seq_len=160)
    assert search_shapes(short, free_pages=240) == [StepShape(15, 160, 160), StepShape(0, 0, 160)]


def test_auto_on_the_cpu_runs_whole_steps_through_the_program() -> None:
    """num_nanobatches="auto" lowers the step to a program (so the search can cut it); without a GPU nothing is
    searched and every step runs whole, with the unsplit model's tokens."""
    import dataclasses

    import torch

    from tests.conftest import DEFAULT_CONFIG, optimized
    from tests.test_generate_parity import _left_padded_batch

    ids, mask = _left_padded_batch([3, 12, 7, 9])
    want = optimized("llama").generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches="auto"))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), want)
    assert model.nanoflow.tunings == [] and model.nanoflow.runner.split_policy is None
    programs = program_runners(model)
    assert programs and all(p.last_schedule is None for p in programs)  # never cut


@settings(max_examples=100, deadline=None)
@given(dense=st.lists(st.integers(1, 15), max_size=4), attention=st.lists(st.integers(1, 15), max_size=6),
       one_unit=st.booleans())
def test_an_uneven_cut_waits_for_exactly_the_overlapping_producers(dense: list[int], attention: list[int],
                                                                   one_unit: bool) -> None:
    """Attention calls cut apart from the dense pieces (NanoFlow's uneven splits): the Schedule is valid and each
    nano-op on the other unit waits for exactly the producers' nano-ops whose tokens overlap its own."""
    from nanoflow_fx.runtime.program_runner import schedule_of

    cut = (0, *sorted(set(dense)), 16)
    attn = (0, *sorted(set(attention)), 16)
    schedule = schedule_of(KINDS, cut, one_unit, attn)  # (validates)
    splits = dict(schedule.splits)
    groups = {g.name: g for g in schedule.groups}
    assert splits["nb"].boundaries == cut
    assert groups["L0.attn"].split == ("attn" if attn != cut else "nb")
    for op in schedule.ops:
        group = groups[op.group]
        lo, hi = schedule.token_range(op.group, op.nanobatch)
        want = set()
        for dep in group.deps:
            if one_unit or groups[dep].op_class == group.op_class:
                continue
            n = len(splits[groups[dep].split].boundaries) - 1
            want |= {(dep, j) for j in range(n) if schedule.token_range(dep, j)[0] < hi
                     and lo < schedule.token_range(dep, j)[1]}
        assert set(op.waits) == want

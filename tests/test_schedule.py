"""Tests of the Schedule IR: hand-built schedules (golden text), text round trip, validate, simulate / timelines.

Property tests use hypothesis; oracles here (token overlap, reachability) are written independently of
the library's bitset / bisect code so they check it rather than restate it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from nanoflow_fx.schedule import (
    OP_CLASSES,
    NanoOp,
    OpGroup,
    Schedule,
    ScheduleError,
    Split,
    format_schedule,
    format_timeline,
    parse_schedule,
    simulate,
    validate,
)
from tests.schedules import add_needed_waits, nanoflow_pingpong, sequential, split_4_2

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Key = tuple[str, int]

# ---------------------------------------------------------------- golden text of the builders

PINGPONG_1x1024 = """\
tokens 1024
split s2 0 512 1024
group L0.qkv gemm s2
group L0.attn attention s2 <- L0.qkv
group L0.o gemm s2 <- L0.attn
group L0.ffn gemm s2 <- L0.o
units compute memory
compute L0.qkv#0
memory L0.attn#0 <- L0.qkv#0
compute L0.qkv#1
memory L0.attn#1 <- L0.qkv#1
compute L0.o#0 <- L0.attn#0
compute L0.ffn#0
compute L0.o#1 <- L0.attn#1
compute L0.ffn#1
"""

# o#0 covers tokens [0, 1024) = attn#0 + attn#1; waiting on attn#1 suffices since attn#0 precedes it on memory.
SPLIT_4_2_1x2048 = """\
tokens 2048
split s4 0 512 1024 1536 2048
split s2 0 1024 2048
group L0.qkv gemm s4
group L0.attn attention s4 <- L0.qkv
group L0.o gemm s2 <- L0.attn
group L0.ffn gemm s2 <- L0.o
units compute memory
compute L0.qkv#0
memory L0.attn#0 <- L0.qkv#0
compute L0.qkv#1
memory L0.attn#1 <- L0.qkv#1
compute L0.qkv#2
memory L0.attn#2 <- L0.qkv#2
compute L0.qkv#3
memory L0.attn#3 <- L0.qkv#3
compute L0.o#0 <- L0.attn#1
compute L0.ffn#0
compute L0.o#1 <- L0.attn#3
compute L0.ffn#1
"""


def test_pingpong_golden_text() -> None:
    s = nanoflow_pingpong(1, 1024)
    assert format_schedule(s) == PINGPONG_1x1024
    assert parse_schedule(PINGPONG_1x1024) == s


def test_split_4_2_golden_text() -> None:
    s = split_4_2(1, 2048)
    assert format_schedule(s) == SPLIT_4_2_1x2048
    assert parse_schedule(SPLIT_4_2_1x2048) == s


@pytest.mark.parametrize("build", [sequential, nanoflow_pingpong, split_4_2])
@pytest.mark.parametrize("num_tokens", [4, 7, 2048, 2050])
def test_builders_validate_at_32_layers(build, num_tokens: int) -> None:
    s = build(32, num_tokens)
    validate(s)
    per_layer = {sequential: 4, nanoflow_pingpong: 8, split_4_2: 12}[build]  # nano-ops per layer: sum of cuts
    assert len(s.ops) == 32 * per_layer
    assert parse_schedule(format_schedule(s)) == s


@pytest.mark.parametrize("build", [nanoflow_pingpong, split_4_2])
def test_builder_waits_are_all_needed(build) -> None:
    s = build(2, 64)
    for i, op in enumerate(s.ops):
        for w in op.waits:
            broken = _with_op(s, i, replace(op, waits=tuple(x for x in op.waits if x != w)))
            with pytest.raises(ScheduleError, match="nothing orders"):
                validate(broken)


def test_builders_put_attention_on_memory_and_gemms_on_compute() -> None:
    s = split_4_2(2, 64)
    for op in s.ops:
        assert op.unit == ("memory" if s.group(op.group).op_class == "attention" else "compute")


def test_validate_32_layer_split_4_2_timing() -> None:
    s = split_4_2(32, 2048)
    t0 = time.perf_counter()
    validate(s)
    seconds = time.perf_counter() - t0
    big = _big_schedule(num_layers=32, groups_per_layer=8, nanobatches=4)  # 32 * 8 * 4 = 1024 nano-ops
    t1 = time.perf_counter()
    validate(big)
    big_seconds = time.perf_counter() - t1
    print(f"validate split_4_2(32, 2048), {len(s.ops)} ops: {seconds:.4f} s; "
          f"{len(big.ops)}-op schedule: {big_seconds:.4f} s")


def _big_schedule(num_layers: int, groups_per_layer: int, nanobatches: int) -> Schedule:
    names = [f"L{i}.g{k}" for i in range(num_layers) for k in range(groups_per_layer)]
    groups = tuple(OpGroup(n, "gemm", "s", (names[j - 1],) if j else ()) for j, n in enumerate(names))
    ops = tuple(NanoOp(n, b, ("compute", "memory")[j % 2]) for j, n in enumerate(names) for b in range(nanobatches))
    return add_needed_waits(Schedule(4096, (("s", Split.even(4096, nanobatches)),), groups, ("compute", "memory"), ops))


# ---------------------------------------------------------------- IR records


def test_split_even_and_ranges() -> None:
    s = Split.even(10, 3)
    assert s == Split((0, 4, 7, 10))
    assert (s.num_nanobatches, s.num_tokens, s.range(1)) == (3, 10, (4, 7))
    assert list(Split((0, 256, 512, 768, 1024)).overlapping(0, 512)) == [0, 1]
    with pytest.raises(ScheduleError, match="out of range"):
        s.range(3)


@pytest.mark.parametrize("bounds", [(0,), (1, 5), (0, 5, 5), (0, 6, 3), ()])
def test_split_rejects_bad_boundaries(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ScheduleError, match="boundaries"):
        Split(bounds)


def test_split_even_rejects_more_nanobatches_than_tokens() -> None:
    with pytest.raises(ScheduleError, match="n <= num_tokens"):
        Split.even(3, 4)


def test_schedule_helpers() -> None:
    s = split_4_2(1, 2048)
    assert s.split_of("L0.o") == Split((0, 1024, 2048))
    assert s.token_range("L0.attn", 3) == (1536, 2048)
    assert [op.key for op in s.ops_on("memory")] == [("L0.attn", i) for i in range(4)]
    assert s.ops[1].key == ("L0.attn", 0)
    with pytest.raises(ScheduleError, match=r"unknown group 'L9\.qkv'"):
        s.group("L9.qkv")


# ---------------------------------------------------------------- text form

NAMES = st.one_of(
    st.text(alphabet="abLX09._-<>", min_size=1, max_size=5).filter(lambda n: "<-" not in n),
    st.sampled_from(["tokens", "split", "group", "units", "compute", "memory"]),  # keywords are fine as names
)


@st.composite
def splits_of(draw: st.DrawFn, num_tokens: int) -> Split:
    inner = draw(st.lists(st.integers(1, max(1, num_tokens - 1)), max_size=3)) if num_tokens > 1 else []
    return Split((0, *sorted(set(inner) - {num_tokens}), num_tokens))


@st.composite
def any_schedules(draw: st.DrawFn) -> Schedule:
    """Well-typed schedules, mostly invalid: names, counts and references are all random."""
    splits = tuple((draw(NAMES), draw(splits_of(draw(st.integers(1, 40))))) for _ in range(draw(st.integers(0, 3))))
    group_names = draw(st.lists(NAMES, max_size=5))
    groups = tuple(
        OpGroup(name, draw(st.one_of(st.sampled_from(OP_CLASSES), NAMES)), draw(NAMES),
                tuple(draw(st.lists(st.sampled_from(group_names[:i]), max_size=2))) if i else ())
        for i, name in enumerate(group_names)
    )
    refs = st.tuples(st.one_of(NAMES, st.sampled_from(group_names)) if group_names else NAMES, st.integers(-2, 6))
    ops = draw(st.lists(st.builds(lambda r, u, w: NanoOp(r[0], r[1], u, tuple(w)), refs, NAMES,
                                  st.lists(refs, max_size=3)), max_size=8))
    return Schedule(draw(st.integers(-3, 5000)), splits, groups, tuple(draw(st.lists(NAMES, max_size=3))), tuple(ops))


@FAST
@given(any_schedules())
def test_text_round_trip(s: Schedule) -> None:
    text = format_schedule(s)
    assert parse_schedule(text) == s
    assert format_schedule(parse_schedule(text)) == text


@pytest.mark.parametrize("bad", ["", "a b", "a#1", "x<-y", "tab\there"])
def test_format_rejects_unwritable_names(bad: str) -> None:
    s = replace(sequential(1, 8), units=("compute", bad))
    with pytest.raises(ScheduleError, match="names must be non-empty"):
        format_schedule(s)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("split s 0 4\ntokens 4\nunits\n", 1),  # tokens must come first
        ("tokens 4\nsplit s 0 4 2\nunits\n", 2),  # boundaries not increasing
        ("tokens 4\nsplit s 0 4\ngroup g gemm\nunits\n", 3),  # group line too short
        ("tokens 4\nsplit s 0 4\ngroup g gemm s <-\nunits\n", 3),  # arrow without names
        ("tokens 4\nunits c\nc g#x\n", 3),  # nanobatch not an int
        ("tokens 4\nunits c\nc g#0 <- h\n", 3),  # wait without '#'
        ("tokens 4\nunits c\ngroup g gemm s\n", 3),  # group line after units reads as a malformed op line
        ("tokens 4\nsplit s 0 4\n\ngroup g gemm s\nsplit t 0 4\nunits\n", 5),  # split after group
        ("tokens 4\ntokens 4\nunits\n", 2),
    ],
)
def test_parse_errors_name_the_line(text: str, line: int) -> None:
    with pytest.raises(ScheduleError, match=f"^line {line}: "):
        parse_schedule(text)


def test_parse_needs_tokens_and_units_lines() -> None:
    with pytest.raises(ScheduleError, match="no 'units"):
        parse_schedule("tokens 4\nsplit s 0 4\n")
    with pytest.raises(ScheduleError, match="no 'tokens"):
        parse_schedule("# only a comment\n")


def test_parse_ignores_blank_and_comment_lines() -> None:
    text = "# pingpong\n\n" + PINGPONG_1x1024.replace("units", "\n# units\nunits")
    assert parse_schedule(text) == nanoflow_pingpong(1, 1024)


# ---------------------------------------------------------------- validate: random valid schedules


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _needed(s: Schedule, key: Key) -> list[Key]:
    """Oracle: nano-ops that `key` consumes, by explicit token-range overlap."""
    mine = s.token_range(*key)
    return [(d, i) for d in s.group(key[0]).deps for i in range(s.split_of(d).num_nanobatches)
            if _overlaps(mine, s.token_range(d, i))]


def _happens_before(s: Schedule, a: Key, b: Key) -> bool:
    """Oracle: depth-first search from b backwards over waits and program order."""
    preds: dict[Key, list[Key]] = {}
    last: dict[str, Key] = {}
    for op in s.ops:
        preds[op.key] = list(op.waits) + ([last[op.unit]] if op.unit in last else [])
        last[op.unit] = op.key
    stack, seen = list(preds[b]), set()
    while stack:
        k = stack.pop()
        if k == a:
            return True
        if k not in seen:
            seen.add(k)
            stack.extend(preds[k])
    return False


@st.composite
def valid_schedules(draw: st.DrawFn, min_units: int = 1, min_groups: int = 1) -> Schedule:
    """Random splits, a random group DAG, random placement, a random topological order, every cross-unit wait."""
    n = draw(st.integers(1, 24))
    splits = tuple((f"s{k}", draw(splits_of(n))) for k in range(draw(st.integers(1, 3))))
    groups: list[OpGroup] = []
    for i in range(draw(st.integers(min_groups, 6))):
        at_least = min(i, min_groups - 1)  # with min_groups >= 2, every later group has a dep
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, min_size=at_least, max_size=3)) if i else []
        groups.append(OpGroup(f"g{i}", draw(st.sampled_from(OP_CLASSES)), draw(st.sampled_from(splits))[0],
                              tuple(f"g{d}" for d in deps)))
    units = tuple(f"u{k}" for k in range(draw(st.integers(min_units, 3))))
    skeleton = Schedule(n, splits, tuple(groups), units, ())
    keys = [(g.name, i) for g in groups for i in range(skeleton.split(g.split).num_nanobatches)]
    unit_of = {k: draw(st.sampled_from(units)) for k in keys}
    priority = dict(zip(keys, draw(st.permutations(range(len(keys)))), strict=True))
    ops: list[NanoOp] = []
    while len(ops) < len(keys):  # random topological order: the ready op of least priority goes next
        done = {op.key for op in ops}
        ready = [k for k in keys if k not in done and all(d in done for d in _needed(skeleton, k))]
        k = min(ready, key=priority.__getitem__)
        waits = tuple(d for d in _needed(skeleton, k) if unit_of[d] != unit_of[k])
        ops.append(NanoOp(k[0], k[1], unit_of[k], waits))
    return replace(skeleton, ops=tuple(ops))


@FAST
@given(valid_schedules())
def test_random_valid_schedule_validates(s: Schedule) -> None:
    validate(s)
    assert parse_schedule(format_schedule(s)) == s


@FAST
@given(valid_schedules(min_units=2, min_groups=2), st.data())
def test_dropped_wait_rejected_unless_covered(s: Schedule, data: st.DataObject) -> None:
    waiting = [i for i, op in enumerate(s.ops) if op.waits]
    assume(waiting)
    i = data.draw(st.sampled_from(waiting))
    op = s.ops[i]
    dropped = data.draw(st.sampled_from(op.waits))
    broken = _with_op(s, i, replace(op, waits=tuple(w for w in op.waits if w != dropped)))
    if _happens_before(broken, dropped, op.key):
        event("dropped wait still covered")
        validate(broken)  # another path (program order, other waits) still orders them
    else:
        event("dropped wait uncovered")
        with pytest.raises(ScheduleError, match="nothing orders"):
            validate(broken)


@FAST
@given(valid_schedules(), st.data())
def test_broken_schedules_rejected(s: Schedule, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(s.ops) - 1))
    op = s.ops[i]
    dup = replace(s, ops=(*s.ops[:i], op, *s.ops[i:]))
    with pytest.raises(ScheduleError, match="appears twice"):
        validate(dup)
    with pytest.raises(ScheduleError, match=r"missing|does not exist"):
        validate(replace(s, ops=s.ops[:i] + s.ops[i + 1:]))
    with pytest.raises(ScheduleError, match="unit 'nowhere'"):
        validate(_with_op(s, i, replace(op, unit="nowhere")))
    out_of_range = s.split_of(op.group).num_nanobatches
    with pytest.raises(ScheduleError, match="out of range"):
        validate(_with_op(s, i, replace(op, nanobatch=out_of_range)))


@FAST
@given(valid_schedules(min_units=2), st.data())
def test_cross_unit_wait_cycle_rejected(s: Schedule, data: st.DataObject) -> None:
    assume(len({op.unit for op in s.ops}) >= 2)
    i = data.draw(st.integers(0, len(s.ops) - 1))
    j = data.draw(st.sampled_from([j for j, op in enumerate(s.ops) if op.unit != s.ops[i].unit]))
    a, b = s.ops[i], s.ops[j]
    broken = _with_op(_with_op(s, i, replace(a, waits=(*a.waits, b.key))), j, replace(b, waits=(*b.waits, a.key)))
    with pytest.raises(ScheduleError, match="happens-before cycle"):
        validate(broken)


@FAST
@given(valid_schedules())
def test_add_needed_waits_keeps_validity_and_each_wait_is_needed(s: Schedule) -> None:
    stripped = replace(s, ops=tuple(replace(op, waits=()) for op in s.ops))
    rebuilt = add_needed_waits(stripped)
    validate(rebuilt)
    for i, op in enumerate(rebuilt.ops):
        for w in op.waits:
            with pytest.raises(ScheduleError, match="nothing orders"):
                validate(_with_op(rebuilt, i, replace(op, waits=tuple(x for x in op.waits if x != w))))


def _with_op(s: Schedule, i: int, op: NanoOp) -> Schedule:
    return replace(s, ops=(*s.ops[:i], op, *s.ops[i + 1:]))


# ---------------------------------------------------------------- validate: hand-written cases


def _tiny(**changes: object) -> Schedule:
    return replace(nanoflow_pingpong(1, 8), **changes)


def test_validate_names_the_problem() -> None:
    s = nanoflow_pingpong(1, 8)
    cases = [
        (_tiny(splits=(("s2", Split((0, 4, 9))),)), "covers 9 tokens"),
        (_tiny(units=("compute", "memory", "compute")), "unit name 'compute' is used twice"),
        (_tiny(groups=(replace(s.groups[0], op_class="matmul"), *s.groups[1:])), "op_class 'matmul'"),
        (_tiny(groups=(replace(s.groups[0], split="s9"), *s.groups[1:])), "split 's9'"),
        (_tiny(groups=(replace(s.groups[0], deps=("L0.ffn",)), *s.groups[1:])), "group dependency cycle"),
        (_tiny(groups=(replace(s.groups[0], deps=("L7.x",)), *s.groups[1:])), "depends on 'L7.x'"),
        (_with_op(s, 1, replace(s.ops[1], waits=(("L0.qkv", 5),))), "waits on L0.qkv#5, which does not exist"),
        (_with_op(s, 1, replace(s.ops[1], waits=())), "L0.attn#0 .* consumes L0.qkv#0"),
    ]
    for broken, message in cases:
        with pytest.raises(ScheduleError, match=message):
            validate(broken)


def test_same_unit_reordering_is_a_cycle_or_a_missing_order() -> None:
    s = sequential(1, 8)
    swapped = replace(s, ops=(s.ops[1], s.ops[0], *s.ops[2:]))  # attn before qkv on the one unit
    with pytest.raises(ScheduleError, match=r"L0\.attn#0 .* consumes L0\.qkv#0"):
        validate(swapped)
    waits_later = _with_op(s, 0, replace(s.ops[0], waits=(("L0.ffn", 0),)))
    with pytest.raises(ScheduleError, match=r"happens-before cycle: .*compute order"):
        validate(waits_later)


# ---------------------------------------------------------------- timeline


def _token_cost(s: Schedule):
    """1 us per token for every op class: attention costs the same as a GEMM of the same slice."""
    return lambda op: float(s.token_range(*op.key)[1] - s.token_range(*op.key)[0])


def test_sequential_makespan_is_sum_of_costs() -> None:
    s = sequential(3, 128)
    tl = simulate(s, lambda op: 1.0)
    assert tl.makespan_us == 12.0  # 3 layers * 4 groups * 1 nano-batch, all on one unit
    assert [slot.start_us for slot in tl.rows[0][1]] == [float(i) for i in range(12)]


def test_pingpong_beats_sequential_at_equal_attention_and_gemm_cost() -> None:
    seq, pp = sequential(4, 1024), nanoflow_pingpong(4, 1024)
    seq_us = simulate(seq, _token_cost(seq)).makespan_us
    pp_us = simulate(pp, _token_cost(pp)).makespan_us
    assert seq_us == 4 * 4 * 1024
    assert pp_us < seq_us  # attention hides behind the other half's GEMMs
    assert pp_us == 4 * 3 * 1024  # compute never idles: 3 GEMM groups * 1024 tokens per layer


def test_simulate_respects_waits_and_program_order() -> None:
    s = split_4_2(2, 64)
    tl = simulate(s, lambda op: 1.0 + len(op.group))
    end = {slot.op.key: slot.end_us for _, slots in tl.rows for slot in slots}
    for _, slots in tl.rows:
        for prev, slot in itertools.pairwise(slots):
            assert slot.start_us >= prev.end_us
        for slot in slots:
            assert all(slot.start_us >= end[w] for w in slot.op.waits)


def test_simulate_rejects_invalid_schedule_and_negative_cost() -> None:
    s = nanoflow_pingpong(1, 8)
    with pytest.raises(ScheduleError, match="consumes"):
        simulate(_with_op(s, 1, replace(s.ops[1], waits=())), lambda op: 1.0)
    with pytest.raises(ScheduleError, match="finite and >= 0"):
        simulate(s, lambda op: -1.0)


def test_format_timeline_golden() -> None:
    s = nanoflow_pingpong(1, 1024)
    # 3072 us over 60 columns: 51.2 us per column, so each 512-token op is 10 columns.
    expected = (
        "makespan 3072.000 us (60 columns)\n"
        "compute |qkv0------qkv1------o0--------ffn0------o1--------ffn1------|\n"
        "memory  |..........attn0-----attn1-----..............................|"
    )
    assert format_timeline(simulate(s, _token_cost(s)), width=70) == expected


@pytest.mark.parametrize("build", [sequential, nanoflow_pingpong, split_4_2])
def test_format_timeline_one_row_per_unit(build) -> None:
    s = build(2, 64)
    lines = format_timeline(simulate(s, lambda op: 1.0), width=50).split("\n")
    assert len(lines) == 1 + len(s.units)
    assert [line.split()[0] for line in lines[1:]] == list(s.units)
    assert all(len(line) == 50 for line in lines[1:])
    with pytest.raises(ValueError, match="width"):
        format_timeline(simulate(s, lambda op: 1.0), width=5)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_concurrent_time_is_when_both_units_run_an_op(data: st.DataObject) -> None:
    """`Timeline.concurrent_us` against checking each microsecond of a simulated ping-pong with integer costs."""
    s = nanoflow_pingpong(1, 1024)
    costs = {op.key: data.draw(st.integers(0, 6)) for op in s.ops}
    tl = simulate(s, lambda op: costs[op.key])
    busy = {unit: [(slot.start_us, slot.end_us) for slot in slots] for unit, slots in tl.rows}
    both = sum(all(any(a <= t + 0.5 < b for a, b in busy[u]) for u in ("compute", "memory"))
               for t in range(int(tl.makespan_us)))
    assert tl.concurrent_us("compute", "memory") == both == tl.concurrent_us("memory", "compute")
    assert tl.concurrent_us("compute", "nowhere") == 0.0

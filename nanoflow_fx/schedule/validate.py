"""`validate(schedule)`: check every whole-schedule invariant of the Schedule IR, or raise ScheduleError.

Invariants (each error message names the offending split, group or nano-op, and the fix):

1. Names: split, group and unit names are unique; every Split covers exactly `num_tokens` tokens.
2. Groups: each op_class is in OP_CLASSES, each split and dep names an existing entry, the group
   dependency graph is acyclic.
3. Ops: each op's unit is in `units`, its group exists, its nanobatch is in range; every
   (group, nanobatch) appears exactly once; every wait names an existing nano-op.
4. Happens-before (waits plus program order on each unit, transitively) is acyclic.
5. Dependencies are kept: if group G depends on D, every nano-batch i of D whose token range overlaps
   nano-batch j of G happens-before (G, j). Splits may differ per group; overlap is by token range.

Cost: O(ops * (preds + overlapping deps)) big-int operations; a 32-layer, ~1000-op schedule takes a few ms.
"""

from __future__ import annotations

from nanoflow_fx.schedule.graph import (
    OpGraph,
    ancestor_bits,
    build_op_graph,
    find_cycle,
    topological_order,
)
from nanoflow_fx.schedule.ir import (
    OP_CLASSES,
    NanoOp,
    OpGroup,
    Schedule,
    ScheduleError,
    op_label,
)

__all__ = ["validate"]


def validate(schedule: Schedule) -> None:
    """Return None if `schedule` keeps every invariant listed in this module's docstring; else ScheduleError."""
    _check_names(schedule)
    _check_groups(schedule)
    _check_ops(schedule)
    graph = build_op_graph(schedule)  # raises on a happens-before cycle
    _check_deps_kept(schedule, graph)


def _check_unique(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ScheduleError(f"{kind} name {name!r} is used twice; rename one of them")
        seen.add(name)


def _check_names(s: Schedule) -> None:
    if type(s.num_tokens) is not int or s.num_tokens < 1:
        raise ScheduleError(f"Schedule.num_tokens={s.num_tokens!r} must be a positive int")
    _check_unique("split", [name for name, _ in s.splits])
    _check_unique("group", [g.name for g in s.groups])
    _check_unique("unit", list(s.units))
    for name, split in s.splits:
        if split.num_tokens != s.num_tokens:
            raise ScheduleError(
                f"split {name!r} covers {split.num_tokens} tokens but the schedule has num_tokens={s.num_tokens}; "
                f"make its last boundary {s.num_tokens}"
            )


def _check_groups(s: Schedule) -> None:
    split_names = {name for name, _ in s.splits}
    group_names = {g.name for g in s.groups}
    for g in s.groups:
        if g.op_class not in OP_CLASSES:
            raise ScheduleError(f"group {g.name!r} has op_class {g.op_class!r}; use one of {OP_CLASSES}")
        if g.split not in split_names:
            raise ScheduleError(f"group {g.name!r} is cut by split {g.split!r}, which is not in Schedule.splits")
        for d in g.deps:
            if d not in group_names:
                raise ScheduleError(f"group {g.name!r} depends on {d!r}, which is not a group of the schedule")
    _check_group_dag(s.groups)


def _check_group_dag(groups: tuple[OpGroup, ...]) -> None:
    index = {g.name: i for i, g in enumerate(groups)}
    preds = [[index[d] for d in g.deps] for g in groups]
    order = topological_order(preds)
    if len(order) < len(groups):
        cycle = find_cycle(preds, set(range(len(groups))) - set(order))
        raise ScheduleError(
            f"group dependency cycle: {' -> '.join(groups[i].name for i in cycle)} (each feeds the next); "
            "the unsplit graph must be a DAG"
        )


def _check_ops(s: Schedule) -> None:
    units = set(s.units)
    for op in s.ops:
        if op.unit not in units:
            raise ScheduleError(
                f"nano-op {op_label(op.key)} is on unit {op.unit!r}, which is not in units {s.units}; "
                "add the unit or move the op"
            )
        _check_key(s, op.key, f"nano-op {op_label(op.key)}")
        for w in op.waits:
            _check_key(s, w, f"nano-op {op_label(op.key)} waits on {op_label(w)}, which does not exist:")
    _check_each_op_once(s)


def _check_key(s: Schedule, key: tuple[str, int], what: str) -> None:
    group, nb = key
    try:
        n = s.split_of(group).num_nanobatches
    except ScheduleError:
        raise ScheduleError(f"{what} names unknown group {group!r}; add the group or fix the name") from None
    if type(nb) is not int or not 0 <= nb < n:
        raise ScheduleError(
            f"{what} nanobatch {nb!r} is out of range: group {group!r} is cut into {n} nano-batches (0..{n - 1})"
        )


def _check_each_op_once(s: Schedule) -> None:
    seen: dict[tuple[str, int], int] = {}
    for i, op in enumerate(s.ops):
        if op.key in seen:
            raise ScheduleError(
                f"nano-op {op_label(op.key)} appears twice (ops[{seen[op.key]}] and ops[{i}]); keep one of them"
            )
        seen[op.key] = i
    for g in s.groups:
        for nb in range(s.split(g.split).num_nanobatches):
            if (g.name, nb) not in seen:
                raise ScheduleError(
                    f"nano-op {op_label((g.name, nb))} is missing: every nano-batch of every group must appear "
                    "exactly once in Schedule.ops"
                )


def _check_deps_kept(s: Schedule, graph: OpGraph) -> None:
    bits = ancestor_bits(graph)
    for g in s.groups:
        own = s.split(g.split)
        for d in g.deps:
            dep_split = s.split_of(d)
            for j in range(own.num_nanobatches):
                v = graph.index[(g.name, j)]
                for i in dep_split.overlapping(*own.range(j)):
                    if not bits[v] >> graph.index[(d, i)] & 1:
                        raise ScheduleError(_missing_order_message(s, graph.ops[v], (d, i)))


def _missing_order_message(s: Schedule, op: NanoOp, dep: tuple[str, int]) -> str:
    a, b = s.token_range(*op.key)
    c, d = s.token_range(*dep)
    return (
        f"nano-op {op_label(op.key)} (tokens [{a}, {b}), unit {op.unit!r}) consumes {op_label(dep)} "
        f"(tokens [{c}, {d})) of dep group {dep[0]!r}, but nothing orders {op_label(dep)} before it; "
        f"add {dep!r} to its waits, or put both on one unit with {op_label(dep)} first"
    )

"""Simulate a schedule under a per-op cost function, and draw the result as a text timeline.

    tl = simulate(nanoflow_pingpong(1, 1024), cost_us=lambda op: 1.0)
    print(format_timeline(tl, width=60))

The simulation is the contract the GPU runtime approximates: each unit runs its ops one at a time in
program order, and an op starts once the previous op on its unit and every op it waits on have ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nanoflow_fx.schedule.graph import build_op_graph
from nanoflow_fx.schedule.ir import NanoOp, Schedule, ScheduleError, op_label
from nanoflow_fx.schedule.validate import validate

__all__ = ["Slot", "Timeline", "covered_length", "format_timeline", "overlap_length", "simulate"]

Intervals = Iterable[tuple[float, float]]


def covered_length(intervals: Intervals) -> float:
    """How much of the line (start, end) `intervals` cover together (overlaps counted once)."""
    return sum(end - start for start, end in _merged(intervals))


def overlap_length(a: Intervals, b: Intervals) -> float:
    """How much of the line is covered both by an interval of `a` and by one of `b`."""
    x, y = _merged(a), _merged(b)
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def _merged(intervals: Intervals) -> list[tuple[float, float]]:
    """The disjoint intervals covering `intervals`, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class Slot:
    """One nano-op's simulated run on its unit."""

    op: NanoOp
    start_us: float
    end_us: float


@dataclass(frozen=True)
class Timeline:
    """Per-unit slots in program order (units in Schedule.units order), and when the last op ends."""

    rows: tuple[tuple[str, tuple[Slot, ...]], ...]
    """(unit, its slots in program order) for every unit of the schedule, idle units included."""
    makespan_us: float
    """End of the last op (0.0 for a schedule without ops)."""

    def concurrent_us(self, a: str, b: str) -> float:
        """How long units `a` and `b` both run an op (0.0 if either has none)."""
        slots = dict(self.rows)
        return overlap_length(((s.start_us, s.end_us) for s in slots.get(a, ())),
                              ((s.start_us, s.end_us) for s in slots.get(b, ())))


def simulate(schedule: Schedule, cost_us: Callable[[NanoOp], float]) -> Timeline:
    """Run `schedule` on an ideal machine where op `op` takes `cost_us(op)` microseconds.

    Requires: `schedule` is valid (simulate calls `validate` and lets its ScheduleError through) and every
    cost is finite and >= 0. Ensures: op start = max(end of the previous op on its unit, end of each
    op it waits on); ops start as early as that allows.
    """
    validate(schedule)
    graph = build_op_graph(schedule)
    end = [0.0] * len(graph.ops)
    slots: list[Slot | None] = [None] * len(graph.ops)
    for v in graph.order:
        op = graph.ops[v]
        start = max((end[p] for p in graph.preds[v]), default=0.0)
        end[v] = start + _checked_cost(op, cost_us(op))
        slots[v] = Slot(op, start, end[v])
    rows = tuple(
        (unit, tuple(s for s in slots if s is not None and s.op.unit == unit)) for unit in schedule.units
    )
    return Timeline(rows, max(end, default=0.0))


def _checked_cost(op: NanoOp, cost: float) -> float:
    cost = float(cost)
    if not math.isfinite(cost) or cost < 0:
        raise ScheduleError(f"cost_us({op_label(op.key)}) returned {cost!r}; costs must be finite and >= 0")
    return cost


def format_timeline(timeline: Timeline, width: int = 80) -> str:
    """A text picture of `timeline`: a header line, then one row per unit, each `width` characters wide.

    Each row is the unit name (padded), ' |', a bar, '|'. Time maps linearly onto the bar; an op is drawn
    as its label (last part of the group name + nanobatch, e.g. "qkv0") followed by '-' for its length,
    cut to its length; idle time is '.'. Ops shorter than half a column may vanish. Deterministic.
    """
    name_width = max((len(unit) for unit, _ in timeline.rows), default=0)
    bar_width = width - name_width - 3
    if bar_width < 1:
        raise ValueError(f"format_timeline(width={width}) leaves no room for the bar; use width >= {name_width + 4}")
    header = f"makespan {timeline.makespan_us:.3f} us ({bar_width} columns)"
    rows = [f"{unit.ljust(name_width)} |{_bar(slots, timeline.makespan_us, bar_width)}|"
            for unit, slots in timeline.rows]
    return "\n".join([header, *rows])


def _bar(slots: tuple[Slot, ...], makespan_us: float, bar_width: int) -> str:
    cells = ["."] * bar_width
    for slot in slots:
        first, last = _column(slot.start_us, makespan_us, bar_width), _column(slot.end_us, makespan_us, bar_width)
        label = f"{slot.op.group.rsplit('.', 1)[-1]}{slot.op.nanobatch}"
        cells[first:last] = (label + "-" * (last - first))[: last - first]
    return "".join(cells)


def _column(t_us: float, makespan_us: float, bar_width: int) -> int:
    """The bar column where time t_us falls (rounded half up), in [0, bar_width]."""
    if makespan_us <= 0:
        return 0
    return min(bar_width, math.floor(t_us / makespan_us * bar_width + 0.5))

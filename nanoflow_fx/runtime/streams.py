"""The stream plan of a Schedule: one stream per execution unit, events for cross-unit waits.

`stream_actions(schedule)` is the plan (pure; tested on the CPU): the nano-ops in an order that in-order
streams with waits can run them (`stream_order`), each with the cross-unit nano-ops it must wait for and
whether a later nano-op on another unit waits for it (then it records an event). Waits within a unit are
implied by the stream's order and need no event.

`runtime.program_runner.ProgramRunner` issues a nano-batched step by that plan: a fork (every unit stream waits
for the current stream), each nano-op on its unit's stream after waiting for the events of its cross-unit
dependencies, then a join (the current stream waits for every unit stream). Only ordinary stream events are used:
green-context streams can be captured in a CUDA graph with fork/join, but their context-wide events cannot.
Every intermediate value stays referenced until the join, so no allocator block is reused across streams
while another stream may still read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoflow_fx.schedule import Schedule, ScheduleError, op_label

__all__ = ["StreamAction", "stream_actions", "stream_order"]

Key = tuple[str, int]


@dataclass(frozen=True)
class StreamAction:
    """Run nano-op `key` on `unit` after the events of `waits` (nano-ops of other units); `record`: record an
    event after it, because a nano-op of another unit waits for it."""

    key: Key
    unit: str
    waits: tuple[Key, ...]
    record: bool


def stream_actions(schedule: Schedule) -> list[StreamAction]:
    """The nano-ops of `schedule` as stream actions, in an order in-order streams can issue them."""
    ops = {op.key: op for op in schedule.ops}
    cross = {op.key: tuple(w for w in op.waits if ops[w].unit != op.unit) for op in schedule.ops}
    waited_for = {w for waits in cross.values() for w in waits}
    return [StreamAction(key, ops[key].unit, cross[key], key in waited_for) for key in stream_order(schedule)]


def stream_order(schedule: Schedule) -> list[tuple[str, int]]:
    """The nano-ops in the order in-order units with waits run them (round-robin over ready unit heads)."""
    queues = {unit: [op for op in schedule.ops if op.unit == unit] for unit in schedule.units}
    done: set[tuple[str, int]] = set()
    order = []
    while any(queues.values()):
        progressed = False
        for unit in schedule.units:
            queue = queues[unit]
            if queue and all(w in done for w in queue[0].waits):
                op = queue.pop(0)
                done.add(op.key)
                order.append(op.key)
                progressed = True
        if not progressed:
            heads = [op_label(q[0].key) for q in queues.values() if q]
            raise ScheduleError(f"schedule deadlocks: every unit waits ({', '.join(heads)})")
    return order

"""A Schedule replayed on CUDA streams: one stream per execution unit, events for cross-unit waits.

`stream_actions(schedule)` is the plan (pure; tested on the CPU): the nano-ops in an order that in-order
streams with waits can run them (`stream_order`), each with the cross-unit nano-ops it must wait for and
whether a later nano-op on another unit waits for it (then it records an event). Waits within a unit are
implied by the stream's order and need no event.

`CudaScheduleExecutor` runs a split step graph by that plan: shared nodes on the current stream, a fork (every
unit stream waits for the current stream), each nano-op on its unit's stream after waiting for the events of
its cross-unit dependencies, then a join (the current stream waits for every unit stream) and the output
merges on the current stream. Only ordinary stream events are used, so the whole step can be captured in a
CUDA graph (measured on an H100: green-context streams capture with fork/join; their context-wide events do not).
Every intermediate value stays referenced until the step returns, so no allocator block is reused across
streams while another stream may still read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.runtime.schedule_executor import ScheduleExecutor, stream_order
from nanoflow_fx.schedule import Schedule, op_label

__all__ = ["CudaScheduleExecutor", "StreamAction", "stream_actions"]

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


class CudaScheduleExecutor(ScheduleExecutor):
    """Executes a split step graph on CUDA, one stream per unit of its Schedule (see the module docstring).

    `streams` maps each unit to its stream (plain streams, or green-context streams confined to an SM
    partition); a unit missing from it gets a plain stream of its own."""

    def __init__(self, gm: GraphModule, schedule: Schedule, streams: Mapping[str, torch.cuda.Stream]) -> None:
        super().__init__(gm, schedule)
        self.actions = stream_actions(schedule)  # in `self.order`'s order: both come from `stream_order`
        self.streams = {unit: streams.get(unit) or torch.cuda.Stream() for unit in schedule.units}

    def _run_nanoops(self, env: dict[Node, Any]) -> None:
        main = torch.cuda.current_stream()
        fork = torch.cuda.Event()
        fork.record(main)
        for stream in self.streams.values():
            stream.wait_event(fork)
        events: dict[Key, torch.cuda.Event] = {}
        for action, (key, nodes) in zip(self.actions, self.order):
            stream = self.streams[action.unit]
            for wait in action.waits:
                stream.wait_event(events[wait])
            with torch.cuda.stream(stream):
                self._run(nodes, env, op_label(key))
            if action.record:
                events[key] = torch.cuda.Event()
                events[key].record(stream)
        for stream in self.streams.values():
            main.wait_stream(stream)

"""`ScheduleExecutor`: runs a split step graph on the CPU in the order its Schedule's streams would.

Shared nodes (weights and what depends only on them) run first, then the nano-ops: each unit is an
in-order queue (the Schedule's program order) and a nano-op starts only once every nano-op it waits on has
finished, as on CUDA streams with events. The order is fixed once, at construction, by simulating the units;
a nano-op that reads a value no finished nano-op produced means the schedule misses a dependency, and is
reported as such. This executor defines what the multi-stream GPU runtime must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.passes.assign_units import nanoop_nodes
from nanoflow_fx.passes.info import info
from nanoflow_fx.schedule import Schedule, ScheduleError, op_label

__all__ = ["ScheduleExecutor", "stream_order"]


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


class ScheduleExecutor:
    """Executes `gm` (a split step graph) nano-op by nano-op in `schedule`'s stream order."""

    def __init__(self, gm: GraphModule, schedule: Schedule) -> None:
        self.gm, self.schedule = gm, schedule
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        ops = nanoop_nodes(gm)
        in_ops = {n for group in ops.values() for n in group}
        self.shared = [n for n in nodes if n.op == "call_function" and not info(n).token_dependent]
        self.epilogue = [n for n in nodes if n.op == "call_function" and info(n).token_dependent and n not in in_ops]
        self.output = next(n for n in nodes if n.op == "output")
        self.order = [(key, ops[key]) for key in stream_order(schedule)]
        missing = set(ops) - {key for key, _ in self.order}
        if missing:
            raise ScheduleError(f"the schedule lacks nano-ops of the graph: {sorted(missing)}")

    def __call__(self, *args: Any) -> Any:
        if len(args) != len(self.placeholders):
            raise TypeError(f"split step graph takes {len(self.placeholders)} inputs, got {len(args)}")
        env: dict[Node, Any] = dict(zip(self.placeholders, args))
        self._run(self.shared, env, "shared nodes")
        self._run_nanoops(env)
        self._run(self.epilogue, env, "output merges")
        return torch.fx.map_arg(self.output.args[0], lambda n: env[n])

    def _run_nanoops(self, env: dict[Node, Any]) -> None:
        """The nano-ops, in stream order, one after another (subclasses place them on streams)."""
        for key, nodes in self.order:
            self._run(nodes, env, op_label(key))

    def _run(self, nodes: Sequence[Node], env: dict[Node, Any], where: str) -> None:
        for node in nodes:
            try:
                args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: env[n])
            except KeyError as err:
                raise ScheduleError(f"{where}: {node.name} reads {err.args[0].name} before the nano-op that "
                                    "makes it ran: the schedule misses a dependency") from None
            env[node] = node.target(*args, **kwargs)

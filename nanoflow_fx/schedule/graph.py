"""The happens-before graph of a schedule's nano-ops: edges from waits and from program order on each unit.

Shared by `validate` (acyclicity, dependency coverage) and `simulate` (start times in topological order).
Reachability is kept as one Python int bitset per op, so a ~1000-op schedule is checked in milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nanoflow_fx.schedule.ir import NanoOp, Schedule, ScheduleError, op_label

__all__ = ["OpGraph", "ancestor_bits", "build_op_graph", "find_cycle", "topological_order"]


@dataclass(frozen=True, eq=False)
class OpGraph:
    """Nano-ops as indices into `ops`; preds[v] are the ops that must finish before op v starts."""

    ops: tuple[NanoOp, ...]
    """The schedule's ops, in global program order."""
    index: Mapping[tuple[str, int], int]
    """(group, nanobatch) -> index into ops."""
    preds: tuple[tuple[int, ...], ...]
    """Direct predecessors of each op: its waits, then the previous op on its unit (if any)."""
    order: tuple[int, ...]
    """A topological order of all ops (ties broken by program order, so it is deterministic)."""


def build_op_graph(schedule: Schedule) -> OpGraph:
    """The happens-before graph of `schedule`.

    Requires: each (group, nanobatch) appears once and every wait names an op of the schedule.
    Ensures: `order` is topological. Raises ScheduleError (naming the ops) on a duplicate op, a wait on a
    missing op, or a cycle.
    """
    ops = schedule.ops
    index = _index_ops(ops)
    last_on_unit: dict[str, int] = {}
    preds: list[tuple[int, ...]] = []
    for i, op in enumerate(ops):
        preds.append(_wait_preds(op, index) + _unit_pred(last_on_unit.get(op.unit)))
        last_on_unit[op.unit] = i
    order = topological_order(preds)
    if len(order) < len(ops):
        raise ScheduleError(_describe_cycle(ops, find_cycle(preds, set(range(len(ops))) - set(order))))
    return OpGraph(ops, index, tuple(preds), tuple(order))


def ancestor_bits(graph: OpGraph) -> list[int]:
    """bits[v] has bit u set iff op u happens-before op v (transitively; never v itself)."""
    bits = [0] * len(graph.ops)
    for v in graph.order:
        acc = 0
        for p in graph.preds[v]:
            acc |= bits[p] | (1 << p)
        bits[v] = acc
    return bits


def _index_ops(ops: tuple[NanoOp, ...]) -> dict[tuple[str, int], int]:
    index: dict[tuple[str, int], int] = {}
    for i, op in enumerate(ops):
        if op.key in index:
            raise ScheduleError(
                f"nano-op {op_label(op.key)} appears twice (ops[{index[op.key]}] and ops[{i}]); keep one of them"
            )
        index[op.key] = i
    return index


def _wait_preds(op: NanoOp, index: Mapping[tuple[str, int], int]) -> tuple[int, ...]:
    for w in op.waits:
        if w not in index:
            raise ScheduleError(
                f"nano-op {op_label(op.key)} waits on {op_label(w)}, which is not in the schedule; "
                "add that op or drop the wait"
            )
    return tuple(index[w] for w in op.waits)


def _unit_pred(previous: int | None) -> tuple[int, ...]:
    """Program order: an op depends on the op before it on the same unit."""
    return () if previous is None else (previous,)


def topological_order(preds: Sequence[Sequence[int]]) -> list[int]:
    """Nodes 0..n-1 in an order where each comes after its preds (Kahn's algorithm, smallest ready node
    first, so the order is deterministic). Nodes on or after a cycle are left out."""
    succs: list[list[int]] = [[] for _ in preds]
    indegree = [0] * len(preds)
    for v, ps in enumerate(preds):
        for p in ps:
            succs[p].append(v)
            indegree[v] += 1
    ready = [v for v, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        v = heapq.heappop(ready)
        order.append(v)
        for s in succs[v]:
            indegree[s] -= 1
            if indegree[s] == 0:
                heapq.heappush(ready, s)
    return order


def find_cycle(preds: Sequence[Sequence[int]], stuck: set[int]) -> list[int]:
    """One cycle [a, b, ..., a] (each node a pred of the next) among the nodes `topological_order` left out.

    Each stuck node has a stuck pred, so walking back along preds from any of them must repeat a node.
    """
    pos: dict[int, int] = {}
    path: list[int] = []
    cur = min(stuck)
    while cur not in pos:
        pos[cur] = len(path)
        path.append(cur)
        cur = next(p for p in preds[cur] if p in stuck)
    cycle = path[pos[cur]:][::-1]  # walked backwards along preds; reverse to read in happens-before order
    return [*cycle, cycle[0]]


def _describe_cycle(ops: tuple[NanoOp, ...], cycle: list[int]) -> str:
    text = op_label(ops[cycle[0]].key)
    for a, b in itertools.pairwise(cycle):
        how = "wait" if ops[a].key in ops[b].waits else f"{ops[b].unit} order"
        text += f" -[{how}]-> {op_label(ops[b].key)}"
    return f"happens-before cycle: {text}; remove one of these waits or reorder the ops on the unit"

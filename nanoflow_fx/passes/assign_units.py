"""Pass `assign_units(policy)`: place every nano-op of a split graph on an execution unit -> `Schedule`.

Requires: `split_nanobatches` (every token-dependent node tagged with its group and nano-batch).
Ensures: a valid `Schedule` (checked by `nanoflow_fx.schedule.validate`) holding every (group, nano-batch)
exactly once, each group's token split, its data dependencies in the unsplit graph, and waits that cover
every cross-unit dependency, including the chain between the attention copies of one layer (copy i reads
KV that copy i-1 wrote when a request straddles their boundary). The graph is not changed.

The policy maps op classes to units (default: attention on "memory", GEMMs and the rest on "compute",
collectives on "network"; one unit when nothing is split). The order on each unit comes from a list
schedule (`_list_schedule`) in which nano-batch i+1 trails nano-batch i by half a layer: with two
nano-batches this yields NanoFlow's ping-pong, one half's attention under the other half's GEMMs.

    before: nodes tagged (L0.qkv, 0), (L0.qkv, 1), (L0.attn, 0), ...
    after:  Schedule(units=("compute", "memory"), ops=(compute L0.qkv#0, compute L0.qkv#1,
                     memory L0.attn#0 <- L0.qkv#0, ...))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from nanoflow_fx.passes.info import info
from nanoflow_fx.passes.plan import NanobatchPlan
from nanoflow_fx.passes.split_nanobatches import OUTPUT
from nanoflow_fx.schedule import NanoOp, OpGroup, Schedule, validate

__all__ = ["UnitPolicy", "assign_units", "nanoop_nodes"]

Key = tuple[str, int]


@dataclass(frozen=True)
class UnitPolicy:
    """Which execution unit runs each op class."""

    units: Mapping[str, str] = field(default_factory=lambda: {
        "attention": "memory", "gemm": "compute", "collective": "network", "other": "compute"})
    single_unit_when_unsplit: bool = True


def nanoop_nodes(gm: GraphModule) -> dict[Key, list[Node]]:
    """Each nano-op's nodes, in graph order (shared nodes and the output merges excluded)."""
    ops: dict[Key, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and info(node).token_dependent and info(node).group != OUTPUT:
            ops.setdefault((info(node).group, info(node).nanobatch), []).append(node)  # type: ignore[arg-type]
    return ops


def assign_units(gm: GraphModule, policy: UnitPolicy | None = None) -> Schedule:
    policy = policy or UnitPolicy()
    plan: NanobatchPlan = gm.meta["nanoflow_plan"]
    ops = nanoop_nodes(gm)
    owner = {node: key for key, nodes in ops.items() for node in nodes}
    deps = {key: {owner[a] for n in nodes for a in n.all_input_nodes if a in owner} - {key}
            for key, nodes in ops.items()}
    _chain_attention(ops, deps)
    groups = _op_groups(ops, deps, plan)
    unit_of = {g.name: _unit(g.op_class, plan, policy) for g in groups}
    order = _list_schedule(ops, deps, unit_of)
    units = tuple(dict.fromkeys(unit_of[g] for g, _ in order))
    nano_ops = tuple(
        NanoOp(g, i, unit_of[g], tuple(sorted(d for d in deps[(g, i)] if unit_of[d[0]] != unit_of[g])))
        for g, i in order
    )
    splits = tuple((name, plan.split(name)) for name in dict.fromkeys(g.split for g in groups))
    schedule = Schedule(plan.num_tokens, splits, groups, units, nano_ops)
    validate(schedule)
    return schedule


def _chain_attention(ops: dict[Key, list[Node]], deps: dict[Key, set[Key]]) -> None:
    for group, i in ops:
        if i > 0 and any(info(n).op_class == "attention" for n in ops[(group, i)]):
            deps[(group, i)].add((group, i - 1))


def _op_groups(ops: dict[Key, list[Node]], deps: dict[Key, set[Key]], plan: NanobatchPlan) -> tuple[OpGroup, ...]:
    names = list(dict.fromkeys(g for g, _ in ops))
    groups = []
    for name in names:
        classes = {info(n).op_class for (g, _), nodes in ops.items() if g == name for n in nodes}
        op_class = next((c for c in ("attention", "collective", "gemm") if c in classes), "other")
        group_deps = {d for (g, _), ds in deps.items() if g == name for d, _ in ds} - {name}
        groups.append(OpGroup(name, op_class, plan.split_of(name), tuple(sorted(group_deps, key=names.index))))
    return tuple(groups)


def _unit(op_class: str, plan: NanobatchPlan, policy: UnitPolicy) -> str:
    if policy.single_unit_when_unsplit and plan.max_nanobatches == 1:
        return policy.units["other"]
    return policy.units.get(op_class, policy.units["other"])


def _list_schedule(ops: dict[Key, list[Node]], deps: dict[Key, set[Key]], unit_of: dict[str, str]) -> list[Key]:
    """Unit-cost list scheduling: each free unit takes its ready nano-op with the smallest skewed rank.

    rank = group's index in the graph + nano-batch * skew, skew = half a layer's groups: nano-batch i+1 trails
    nano-batch i by half a layer, so one half's attention meets the other half's O/FFN GEMMs (NanoFlow's
    ping-pong) instead of all halves queueing behind each other.
    """
    groups = list(dict.fromkeys(g for g, _ in ops))
    num_attention = sum(1 for g in groups if any(info(n).op_class == "attention" for n in ops[(g, 0)]))
    skew = len(groups) / max(num_attention, 1) / 2
    rank = {key: groups.index(key[0]) + key[1] * skew for key in ops}
    finish: dict[Key, int] = {}
    free_at: dict[str, int] = {}
    order: list[Key] = []
    pending = set(ops)
    while pending:
        ready = [k for k in pending if deps[k] <= finish.keys()]
        starts = {k: max([free_at.get(unit_of[k[0]], 0)] + [finish[d] for d in deps[k]]) for k in ready}
        key = min(ready, key=lambda k: (starts[k], rank[k], k))
        finish[key] = starts[key] + 1
        free_at[unit_of[key[0]]] = finish[key]
        order.append(key)
        pending.remove(key)
    return order

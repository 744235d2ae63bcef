"""Pass `group_ops`: cut the annotated step graph into op groups, NanoFlow's units of nano-batching.

Requires: `annotate`. Ensures: every token-dependent node has `NodeInfo.group`; shared nodes (weights and
what depends only on them) have none. Each group is a contiguous run of the graph's topological order, so
the group dependency graph is acyclic.

Groups follow NanoFlow's operation classes, found from the graph alone (no model-specific code):
  - each attention op starts `L{i}.attn` (i counts attention ops);
  - a GEMM starts `L{i}.qkv` if a GEMM-free path leads from it to attention i (the QKV projections),
    `L{i}.o` if a GEMM-free path leads to it from attention i (the output projection), else `L{i}.ffn`;
    consecutive GEMMs of one kind share a group (q, k, v; gate, up, down);
  - a node that is not token-parallel starts a `mix` group (e.g. the logits selection and LM head, or a
    sorting MoE dispatch) unless the current group already is one; such groups are never split;
  - other nodes join the group before them; those before any GEMM or attention form `embed`.

    before: embedding, norm, mm(q), mm(k), mm(v), rope, attention, mm(o), add, norm, mm(gate), mm(up), mm(down)
    after:  [embed][L0.qkv .......................][L0.attn  ][L0.o ......][L0.ffn ......................]
"""

from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule, Node

from nanoflow_fx.passes.info import ATTENTION_OP, info, set_info

__all__ = ["group_ops", "group_names"]


def group_ops(gm: GraphModule) -> GraphModule:
    attention = [n for n in gm.graph.nodes if n.target is ATTENTION_OP]
    layer_of = {node: i for i, node in enumerate(attention)}
    feeds_attention = _gemms_reaching(attention, forward=False)
    fed_by_attention = _gemms_reaching(attention, forward=True)
    current, kind_count = "embed", Counter[str]()
    layer = 0
    for node in gm.graph.nodes:
        record = info(node) if node.op == "call_function" else None
        if record is None or not record.token_dependent:
            continue
        if node in layer_of:
            layer = layer_of[node]
            current = _new_group(f"L{layer}.attn", kind_count)
        elif not record.token_parallel:
            if not _base(current).endswith("mix"):
                current = _new_group(f"L{layer}.mix" if attention else "mix", kind_count)
        elif record.op_class == "gemm":
            kind = _gemm_kind(node, feeds_attention, fed_by_attention, layer)
            if _base(current) != kind:
                current = _new_group(kind, kind_count)
        set_info(node, group=current)
    return gm


def group_names(gm: GraphModule) -> list[str]:
    """The groups in graph order."""
    names: list[str] = []
    for node in gm.graph.nodes:
        group = info(node).group if node.op == "call_function" else None
        if group is not None and (not names or names[-1] != group):
            names.append(group)
    return names


def _new_group(base: str, counts: Counter[str]) -> str:
    counts[base] += 1
    return base if counts[base] == 1 else f"{base}{counts[base]}"


def _base(group: str) -> str:
    """The group's kind without the counter `_new_group` appends to repeated kinds ("L3.ffn2" -> "L3.ffn")."""
    return group.rstrip("0123456789")


def _gemm_kind(node: Node, feeds: dict[Node, int], fed_by: dict[Node, int], layer: int) -> str:
    if node in feeds:
        return f"L{feeds[node]}.qkv"
    if node in fed_by:
        return f"L{fed_by[node]}.o"
    return f"L{layer}.ffn"


def _gemms_reaching(attention: list[Node], forward: bool) -> dict[Node, int]:
    """GEMMs joined to attention op i by a path through no other GEMM (downstream if `forward`)."""
    found: dict[Node, int] = {}
    for i, start in enumerate(attention):
        stack, seen = [start], {start}
        while stack:
            node = stack.pop()
            for nxt in (node.users if forward else node.all_input_nodes):
                if nxt in seen or nxt.op != "call_function" or not info(nxt).token_dependent:
                    continue
                seen.add(nxt)
                if info(nxt).op_class == "gemm":
                    found.setdefault(nxt, i)
                elif nxt.target is not ATTENTION_OP:
                    stack.append(nxt)
    return found

"""Pass `split_nanobatches(plan)`: one copy of every node of a cut group per nano-batch, over token slices.

Requires: `annotate` and `group_ops`; a plan whose `num_tokens` is the step's token count (the split graph is
specialised to it, as a CUDA-graph bucket is). Only groups whose nodes are all token-parallel may be cut.
Ensures:
  - each node of a cut group appears once per nano-batch of its split, tagged `NodeInfo(group, nanobatch)`;
    nodes of whole groups appear once, tagged nano-batch 0; shared nodes (weights and what depends only on
    them, e.g. `aten.t(W)`) appear once, untagged, so weights are never split or copied;
  - a nano-batch reads exactly the token rows it covers: from its producer's piece when both use the same
    split, else from slices (and, across differently cut groups, concatenations) of the overlapping pieces;
  - each attention copy reads its own metadata, from new placeholders `nb_<split>_<i>_<field>` appended
    after the original inputs (their order is in `gm.meta["nanoflow_extra_inputs"]`); its KV-cache writes
    go to the same cache, through its own slice of `slot_mapping`;
  - token-count shape arguments become the nano-batch's size; outputs are the merged whole values.
`meta["val"]` is kept on whole and shared nodes; the pieces of cut groups carry none (their sizes are
concrete ints). Attention copy i of a layer reads KV that copy i-1 wrote when a request straddles their
boundary, so copies of one layer must run in order: `assign_units` adds that wait.

    before: %x = mm(%h, %w_t)                     after (2 nano-batches over [0, 3) and [3, 8)):
                                                    %h_0 = slice(%h, 0, 0, 3); %x_0 = mm(%h_0, %w_t)
                                                    %h_1 = slice(%h, 0, 3, 8); %x_1 = mm(%h_1, %w_t)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module

from nanoflow_fx.passes.annotate import token_symbol
from nanoflow_fx.passes.info import ATTENTION_OP, META_KEY, NodeInfo, info, symbol_of
from nanoflow_fx.passes.plan import WHOLE, NanobatchPlan

__all__ = ["split_nanobatches", "METADATA_FIELDS", "OUTPUT"]

aten = torch.ops.aten
OUTPUT = "output"  # group of the merges that feed the graph's outputs, run after every nano-op
METADATA_FIELDS = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")
_ATTENTION_METADATA_ARGS = slice(4, 8)  # positions of METADATA_FIELDS in nanoflow::paged_attention


def split_nanobatches(gm: GraphModule, plan: NanobatchPlan) -> GraphModule:
    _check_plan(gm, plan)
    splitter = _Splitter(gm, plan)
    for node in gm.graph.nodes:
        splitter.copy(node)
    # Lazy: the Python code of a large split graph is generated only if something calls or prints it (the
    # Schedule executor runs the nodes directly), which keeps the pass fast on 32-layer graphs.
    out = _make_graph_module(gm, splitter.graph, class_name="NanobatchedStep", graph_module_cls=_LazyGraphModule)
    out.meta["nanoflow_plan"] = plan
    out.meta["nanoflow_extra_inputs"] = list(splitter.extra)
    return out


def _check_plan(gm: GraphModule, plan: NanobatchPlan) -> None:
    groups: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and info(node).group is not None:
            groups.setdefault(info(node).group, []).append(node)  # type: ignore[arg-type]
    for group, split in plan.group_splits:
        if group not in groups:
            raise ValueError(f"plan cuts group {group!r}, which the graph does not have; groups: {sorted(groups)}")
        mixing = [n for n in groups[group] if not info(n).token_parallel]
        if mixing and plan.split(split).num_nanobatches > 1:
            raise ValueError(f"plan cuts group {group!r}, but its node {mixing[0].name} mixes tokens "
                             f"({info(mixing[0]).why_not_parallel}); leave the group whole")


class _Splitter:
    """Builds the split graph node by node, in the original topological order."""

    def __init__(self, gm: GraphModule, plan: NanobatchPlan) -> None:
        self.plan, self.token = plan, token_symbol(gm)
        self.graph = Graph()
        self.env: dict[Node, Any] = {}  # whole values: placeholders, shared nodes, whole groups
        self.pieces: dict[Node, list[Node]] = {}  # per-nano-batch values of cut groups
        self.cache: dict[tuple[Node, str, int], Any] = {}  # a consumer nano-op's view of a value
        self.extra: dict[tuple[str, int], list[Node]] = {}
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for node in placeholders:
            self.env[node] = self.graph.node_copy(node)
        token_nodes = [n for n in placeholders if symbol_of(n.meta.get("val")) == self.token]
        self.token_node = self.env[token_nodes[0]] if token_nodes else None
        for node in gm.graph.find_nodes(op="call_function", target=ATTENTION_OP):
            self._metadata_placeholders(plan.split_of(info(node).group))  # type: ignore[arg-type]

    def _metadata_placeholders(self, split: str) -> None:
        for i in range(self.plan.split(split).num_nanobatches if split != WHOLE else 0):
            if (split, i) not in self.extra:
                self.extra[(split, i)] = [self.graph.placeholder(f"nb_{split}_{i}_{f}") for f in METADATA_FIELDS]

    def copy(self, node: Node) -> None:
        if node.op == "placeholder":
            return
        if node.op == "output":  # merges for the outputs run after every nano-op: group "output"
            self.graph.output(torch.fx.map_arg(node.args[0], lambda a: self.view_of(a, OUTPUT, WHOLE, 0)))
            return
        record = info(node)
        if not record.token_dependent:
            self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])
            return
        group = record.group
        split = self.plan.split_of(group)  # type: ignore[arg-type]
        copies = [self._copy_for(node, split, i) for i in range(self.plan.split(split).num_nanobatches)]
        if split == WHOLE:
            self.env[node] = copies[0]
            copies[0].meta["val"] = node.meta.get("val")
        else:
            self.pieces[node] = copies

    def _copy_for(self, node: Node, split: str, i: int) -> Node:
        group = info(node).group
        new = self.graph.node_copy(node, lambda a: self.view_of(a, group, split, i))  # type: ignore[arg-type]
        new.meta.pop("val", None)
        new.meta[META_KEY] = NodeInfo(**{**info(node).__dict__, "nanobatch": i})
        if node.target is ATTENTION_OP and split != WHOLE:
            args = list(new.args)
            args[_ATTENTION_METADATA_ARGS] = self.extra[(split, i)]
            new.args = tuple(args)
        return new

    def view_of(self, value: Node, group: str, split: str, i: int) -> Any:
        """`value` as nano-op (group, i) of `split` sees it: its token rows [start, end) of the step."""
        key = (value, group, i)
        if key not in self.cache:
            self.cache[key] = self._view_of(value, group, split, i)
        return self.cache[key]

    def _view_of(self, value: Node, group: str, split: str, i: int) -> Any:
        if not info(value).token_dependent:
            return self.env[value]
        start, end = self.plan.split(split).range(i)
        if symbol_of(value.meta.get("val")) == self.token:  # the token count, as this nano-batch sees it
            return end - start if split != WHOLE else self.token_node
        if value in self.pieces:
            producer = self.plan.split_of(info(value).group)  # type: ignore[arg-type]
            if producer == split:
                return self.pieces[value][i]
            return self._gather(value, producer, (start, end), group, i)
        whole = self.env[value]
        if split == WHOLE:
            return whole
        return self._emit(aten.slice.Tensor, (whole, self._token_dim(value), start, end), group, i)

    def _gather(self, value: Node, producer: str, rows: tuple[int, int], group: str, i: int) -> Node:
        """Rows [start, end) of a value cut by another split: slices of the overlapping pieces, concatenated."""
        parts, dim = [], self._token_dim(value)
        p_split = self.plan.split(producer)
        for k in range(p_split.num_nanobatches):
            p_start, p_end = p_split.range(k)
            lo, hi = max(rows[0], p_start), min(rows[1], p_end)
            if lo >= hi:
                continue
            piece = self.pieces[value][k]
            if (lo, hi) != (p_start, p_end):
                piece = self._emit(aten.slice.Tensor, (piece, dim, lo - p_start, hi - p_start), group, i)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else self._emit(aten.cat.default, (parts, dim), group, i)

    def _emit(self, target: Any, args: tuple, group: str, i: int) -> Node:
        node = self.graph.call_function(target, args)
        node.meta[META_KEY] = NodeInfo(op_class="other", token_dependent=True, token_parallel=True,
                                       group=group, nanobatch=i)
        return node

    def _token_dim(self, value: Node) -> int:
        dim = info(value).token_dim
        if dim is None:
            raise ValueError(f"{value.name} crosses a nano-batch boundary but has no token dimension")
        return dim

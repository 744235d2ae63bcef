"""Fusion of linear layers that read the same input into one GEMM (Q/K/V, gate/up), for any model.

A decode step reads every weight once, so each GEMM runs near the memory bound, and small ones (such as the K
and V projections) further below it than big ones; one GEMM over a group's concatenated weights reads them as one
big weight (the decode step's gain: benchmarks/RESULTS.md). Serving systems load such weights pre-concatenated
(vLLM's QKVParallelLinear, MergedColumnParallelLinear). Here it takes two steps:

1. `relayout_parallel_linears(model)`, before capture: one eager forward with hooks finds the `nn.Linear`s
   called on the same input tensor; each group's weights (and biases) move into one buffer, every parameter's
   `.data` becoming a row-slice view of it. No memory is added, and the eager model computes exactly as before.
2. `fuse_parallel_linears(gm, example_inputs)`, on Dynamo's graph (its placeholders' example inputs are the real
   parameters): each group of `linear(x, W_i, b_i)` calls on the same input node whose weights lie back to back
   in one storage becomes

       y = linear(x, as_strided(W_0, [sum n_i, k]), ...); y_0, y_1, ... = split(y, [n_0, n_1, ...], -1)

   The fused weight is a view spanning the group's parameters (no new graph input, no copy). Each output is a
   column slice of the fused GEMM's output: the same dot products, so fp32 results equal the unfused graph's.

FP8 linears (`capture.fp8_weights.Fp8Linear`, `nanoflow::fp8_linear(x, W, S, b)` in the graph) fuse alike: their
FP8 weights, per-output-channel scales and biases are laid out back to back, and the group becomes one
`fp8_linear` of the spanning views (per-row scales make the fused linear's rows exactly the members' rows).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.capture.fp8_linears import FP8_LINEAR_TARGETS
from nanoflow_fx.capture.fp8_weights import Fp8Linear
from nanoflow_fx.ops.fp8 import fp8_linear

__all__ = ["FusedLayout", "relayout_parallel_linears", "fuse_parallel_linears"]

log = logging.getLogger(__name__)

_LINEAR = torch._C._nn.linear  # what Dynamo records for nn.Linear and F.linear


class FusedLayout:
    """The groups of linears `relayout_parallel_linears` laid out back to back, and how to keep them so.

    The captured step reads each group's weights as one tensor spanning the group, so they must stay adjacent.
    Code that replaces parameters after `optimize()` (`load_state_dict(..., assign=True)`, `.double().float()`,
    ...) breaks that; `restore()` (run before every generate call) lays such groups out again. `undo()` gives
    every parameter its own storage again (a failed `optimize()` leaves the model as it was).
    """

    def __init__(self, groups: Sequence[Sequence[torch.nn.Linear]]) -> None:
        self.groups = [list(g) for g in groups]

    def restore(self) -> None:
        for members in self.groups:
            for params in _group_params(members):
                if not _adjacent(params):
                    _concatenate(params)

    @torch.no_grad()
    def undo(self) -> None:
        for members in self.groups:
            for params in _group_params(members):
                for p in params:
                    p.data = p.data.clone()
        self.groups = []


def _group_params(members: Sequence[torch.nn.Linear]) -> list[list[torch.Tensor]]:
    """The group's tensors that the fused linear reads as one: weights, biases, FP8 weight scales."""
    params = [[m.weight for m in members]]
    if members[0].bias is not None:
        params.append([m.bias for m in members])
    if isinstance(members[0], Fp8Linear):
        params.append([cast(Fp8Linear, m).weight_scale for m in members])
    return params


@torch.no_grad()
def relayout_parallel_linears(model: torch.nn.Module, probe: dict[str, Any]) -> FusedLayout:
    """Put the weights of linears called on the same input back to back in one new buffer per group.

    `probe`: keyword arguments of one small eager forward of `model` (it only has to reach every linear).
    Each group gets a fresh buffer, so every group's first weight starts its storage (the captured step's
    spanning view relies on that, see `_spanning`).
    """
    calls: dict[int, list[torch.nn.Linear]] = {}
    keep: list[torch.Tensor] = []  # inputs stay alive during the probe, so their ids are not reused

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            keep.append(args[0])
            group = calls.setdefault(id(args[0]), [])
            if module not in group:
                group.append(cast(torch.nn.Linear, module))  # (hooked on linears only)

    linears = [m for m in model.modules() if type(m) in (torch.nn.Linear, Fp8Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        model(**probe)
    finally:
        for hook in hooks:
            hook.remove()
    groups = []
    for members in calls.values():
        members = [m for m in members if _fusable(m, members[0])]
        if len(members) >= 2:
            for params in _group_params(members):
                _concatenate(params)
            groups.append(members)
    log.debug("nanoflow: %d groups of linears sharing an input laid out adjacently", len(groups))
    return FusedLayout(groups)


def _fusable(m: torch.nn.Linear, first: torch.nn.Linear) -> bool:
    w, w0 = m.weight, first.weight
    return (type(w) is torch.nn.Parameter and type(m) is type(first) and w.dtype == w0.dtype and w.device == w0.device
            and w.shape[1] == w0.shape[1] and (m.bias is None) == (first.bias is None)
            and (m.bias is None or type(m.bias) is torch.nn.Parameter))


def _concatenate(params: Sequence[torch.Tensor]) -> None:
    fused = torch.cat([p.data.reshape(p.shape) for p in params])
    row = 0
    for p in params:
        p.data = fused[row : row + p.shape[0]]
        row += p.shape[0]


def _adjacent(params: Sequence[torch.Tensor]) -> bool:
    """Whether the tensors are contiguous and lie back to back, in order, in one storage, from its start."""
    if not all(p.is_contiguous() for p in params) or params[0].storage_offset() != 0:
        return False
    storage = params[0].untyped_storage().data_ptr()
    return all(b.untyped_storage().data_ptr() == storage
               and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(params, params[1:]))


def _linear_args(node: Node) -> tuple[Node, tuple[Node | None, ...]] | None:
    """(input, (weight, bias)) of a `linear` call, (input, (weight, scale, bias)) of an `fp8_linear` one."""
    if node.op != "call_function" or (node.target is not _LINEAR and node.target not in FP8_LINEAR_TARGETS):
        return None
    names = ("input", "weight", "bias") if node.target is _LINEAR else ("x", "weight", "weight_scale", "bias")
    args = list(node.args) + [node.kwargs[n] for n in names[len(node.args):] if n in node.kwargs]
    if len(args) == len(names) - 1:
        args.append(None)
    if len(args) != len(names) or not all(isinstance(a, Node) or (i == len(names) - 1 and a is None)
                                          for i, a in enumerate(args)):
        return None
    return cast(Node, args[0]), tuple(cast("Node | None", a) for a in args[1:])


def _parameter(node: Node | None, values: dict[Node, Any], buffer: bool = False) -> torch.Tensor | None:
    """The parameter (or, with `buffer`, the plain tensor: an FP8 weight's scales) a graph input holds."""
    value = values.get(node) if node is not None and node.op == "placeholder" else None
    return value if type(value) is torch.nn.Parameter or (buffer and type(value) is torch.Tensor) else None


def _spanning(graph: torch.fx.Graph, first: Node, params: Sequence[torch.Tensor]) -> Node:
    """A graph node viewing `params` (adjacent in one storage, from its start) as one tensor concatenated along
    dim 0. The offset is 0, not read off the capture's tensors: re-laid-out groups (`FusedLayout.restore`) start
    their new storage too."""
    shape = [sum(p.shape[0] for p in params), *params[0].shape[1:]]  # contiguous: the first's strides hold
    return graph.call_function(torch.as_strided, (first, shape, list(params[0].stride()), 0))


def fuse_parallel_linears(gm: GraphModule, example_inputs: Sequence[Any]) -> int:
    """Fuse, in place, each group of linears sharing an input whose parameters `relayout_parallel_linears`
    made adjacent (see the module doc); returns how many groups."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    groups: dict[tuple[Node, Any, tuple[bool, ...]], list[tuple[Node, tuple[Node | None, ...]]]] = {}
    for node in gm.graph.nodes:
        args = _linear_args(node)
        if args is not None and all(p is None or _parameter(p, values, buffer=True) is not None for p in args[1]) and (
                _parameter(args[1][0], values) is not None):
            x, params = args
            kind = _LINEAR if node.target is _LINEAR else fp8_linear._opoverload
            groups.setdefault((x, kind, tuple(p is not None for p in params)), []).append((node, params))
    graph, fused = gm.graph, 0
    for (x, kind, present), members in groups.items():
        # per parameter position (weight, [scale,] bias): the members' tensors, None where absent
        tensors = [[values[m[1][i]] for m in members] if here else None for i, here in enumerate(present)]
        if len(members) < 2 or not all(t is None or _adjacent(t) for t in tensors):
            continue
        first = members[0][0]
        with graph.inserting_before(first):
            spans = [_spanning(graph, cast(Node, members[0][1][i]), t) if t is not None else None
                     for i, t in enumerate(tensors)]
            out = graph.call_function(kind, (x, *spans))
            sizes = [w.shape[0] for w in cast(list, tensors[0])]
            parts = graph.call_function(torch.split, (out, sizes), {"dim": -1})
            for i, (node, _) in enumerate(members):
                node.replace_all_uses_with(graph.call_function(operator.getitem, (parts, i)))
        for node, _ in members:
            graph.erase_node(node)
        fused += 1
    if fused:
        gm.recompile()
        log.debug("nanoflow fused %d groups of parallel linears", fused)
    return fused

"""Pass `annotate`: op class, FLOPs, bytes, token dimension and token-parallelism of every node.

Requires: an ATen-level GraphModule whose nodes carry `meta["val"]` (fake tensors with symbolic shapes), as
the nanoflow backend captures it. The token count is the symbol of dim 0 of the first attention op's query.
Ensures: every node has a `NodeInfo` under `meta["nanoflow"]`; `meta["val"]` is untouched.

A node is *token-parallel* when each output token row depends only on the same token rows of its inputs:
pointwise ops, GEMMs against weights, reductions over non-token dims, views that keep the token dimension,
embeddings, attention (which mixes tokens only within a request; the split pass gives each copy its own
metadata), and tensor parallelism's all-reduces (elementwise across ranks; an all-gather is not: it stacks ranks
along dim 0). Anything else that touches tokens (indexing, sorting, reductions over tokens, in-place updates,
unknown ops) mixes tokens, and its region stays unsplit. Unknown means mixing: never a silent wrong split.

    before: %mm = aten.mm(%view, %t)                     after: meta["nanoflow"] = NodeInfo(op_class="gemm",
                                                                  flops=2*32*32*s0, token_dim=0, token_parallel=True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import sympy
import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.passes.info import (
    ATTENTION_OP,
    META_KEY,
    NodeInfo,
    info,
    is_getitem,
    op_class,
    symbol_of,
    token_dims,
)

__all__ = ["annotate", "token_symbol"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_LAYOUT = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.transpose.int,
           aten.permute.default, aten.t.default, aten.expand.default, aten.clone.default, aten._to_copy.default,
           aten.alias.default, aten.detach.default, aten.contiguous.default}
_DIM_ARG = {aten.select.int: 1, aten.slice.Tensor: 1, aten.cat.default: 1, aten.split.Tensor: 2,
            aten.split_with_sizes.default: 2, aten._softmax.default: 1, aten._log_softmax.default: 1,
            aten.topk.default: 2, aten.sort.default: 1, aten.cumsum.default: 1}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var_mean.correction,
               aten.argmax.default, aten.any.dim, aten.all.dim}
_NEVER_PARALLEL = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.cumsum.default,
                   aten.sort.default}


def token_symbol(gm: GraphModule) -> sympy.Expr | None:
    """The token count's symbol, read off the first attention op's query (None: no attention op)."""
    for node in gm.graph.find_nodes(op="call_function", target=ATTENTION_OP):
        return symbol_of(node.args[0].meta["val"].shape[0])
    return None


def annotate(gm: GraphModule) -> GraphModule:
    token = token_symbol(gm)
    dependent: set[Node] = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if token is not None and _depends_on_tokens(node, val, token, dependent):
            dependent.add(node)
        is_dependent = node in dependent
        reason = _not_parallel_reason(node, token) if is_dependent and node.op == "call_function" else ""
        dims = token_dims(val, token) if token is not None else []
        node.meta[META_KEY] = NodeInfo(
            op_class=op_class(node) if node.op == "call_function" else "other",
            flops=_flops(node), bytes=_bytes(node),
            token_dim=dims[0] if len(dims) == 1 else None,
            token_dependent=is_dependent,
            token_parallel=is_dependent and not reason,
            why_not_parallel=reason,
        )
    return gm


def _depends_on_tokens(node: Node, val: Any, token: sympy.Expr, dependent: set[Node]) -> bool:
    if node.op == "placeholder":
        return bool(token_dims(val, token)) or symbol_of(val) == token
    if node.op != "call_function":
        return False
    return any(arg in dependent for arg in node.all_input_nodes)


def _not_parallel_reason(node: Node, token: sympy.Expr) -> str:
    """Empty when the node is token-parallel; else why not (for `explain` and debugging)."""
    target, val = node.target, node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return "" if symbol_of(val) == token else f"shape arithmetic {symbol_of(val)} of the token count"
    if is_getitem(node):
        return "" if len(token_dims(val, token)) == 1 else "getitem without a single token dim"
    if not isinstance(target, torch._ops.OpOverload):
        return f"unknown callable {target}"
    if target in _NEVER_PARALLEL:
        return f"{target} mixes tokens"
    if target._schema.is_mutable and target is not ATTENTION_OP:
        return f"{target} mutates an input in place"
    inputs = _token_inputs(node)
    outputs = val if isinstance(val, (tuple, list)) else [val]
    for tensor in [*inputs, *[o for o in outputs if isinstance(o, torch.Tensor)]]:
        if len(token_dims(tensor, token)) != 1:
            return f"a tensor of shape {tuple(tensor.shape)} has no single token dimension"
    return _op_reason(node, token, inputs)


def _token_inputs(node: Node) -> list[torch.Tensor]:
    tensors = []
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if info(arg).token_dependent and isinstance(val, torch.Tensor):
            tensors.append(val)
    return tensors


def _op_reason(node: Node, token: sympy.Expr, inputs: list[torch.Tensor]) -> str:
    target, out = cast(torch._ops.OpOverload, node.target), node.meta["val"]  # (checked by the caller)
    first_out = out[0] if isinstance(out, (tuple, list)) else out
    out_dim = token_dims(first_out, token)[0]
    if target is ATTENTION_OP:
        return "" if all(token_dims(t, token) == [0] for t in inputs) else "attention with tokens off dim 0"
    if torch.Tag.pointwise in target.tags:
        rank = first_out.dim()
        aligned = all(t.dim() - token_dims(t, token)[0] == rank - out_dim for t in inputs)
        return "" if aligned else "broadcast misaligns the token dimension"
    if target in (aten.mm.default, aten.addmm.default):
        weights_only = len(inputs) == 1 and token_dims(cast(Node, node.args[-2]).meta["val"], token) == [0]
        return "" if weights_only else "GEMM whose token operand is not the row operand"
    if target is aten.bmm.default:
        return "" if all(token_dims(t, token) == [0] for t in inputs) else "bmm across tokens"
    if target is aten._scaled_mm.default:  # (x_q [T, K], w [K, N], scale_a [T, 1], scale_b [1, N], ...)
        rows = [cast(Node, node.args[i]).meta["val"] for i in (0, 2)]
        token_rows = len(inputs) == 2 and all(token_dims(t, token) == [0] for t in rows)
        return "" if token_rows else "scaled GEMM whose token operands are not its rows and their scales"
    if target is aten.embedding.default:
        weights = cast(Node, node.args[0]).meta["val"]
        return "" if weights is not inputs[0] and len(inputs) == 1 else "embedding of token weights"
    if target in _VIEWS:
        source = inputs[0]
        in_dim = token_dims(source, token)[0]
        same_prefix = _prod(source.shape[:in_dim]) == _prod(first_out.shape[:out_dim])
        return "" if same_prefix else "view that merges the token dimension with another"
    if target in _LAYOUT:
        return ""
    if target in _DIM_ARG or target in _REDUCTIONS or target is aten.native_layer_norm.default:
        return _dim_reason(node, token, inputs[0])
    if target in _ROW_COLLECTIVES():
        # An all-reduce acts on each element alone: a row slice of the all-reduce is the all-reduce of the row slice
        # (every rank cuts its step alike, so the nano-batches' collectives match across ranks).
        same = len(inputs) == 1 and tuple(inputs[0].shape) == tuple(first_out.shape)
        return "" if same else "collective that reshapes the token dimension"
    return f"{target} is not known to be token-parallel"


def _ROW_COLLECTIVES() -> set[Any]:  # noqa: N802 - a constant, resolved when torch.distributed registered the ops
    ops = getattr(torch.ops, "_c10d_functional", None)
    return {ops.all_reduce.default, ops.wait_tensor.default} if ops is not None else set()


def _dim_reason(node: Node, token: sympy.Expr, source: torch.Tensor) -> str:
    target, rank = cast(torch._ops.OpOverload, node.target), source.dim()
    in_dim = token_dims(source, token)[0]
    if target is aten.native_layer_norm.default:
        return "" if in_dim < rank - len(cast(Sequence[int], node.args[1])) else "layer norm over the token dimension"
    dims: list[int]
    if target in _REDUCTIONS:
        dim = cast("int | Sequence[int] | None", node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    else:
        index = _DIM_ARG[target]
        default = -1 if target in (aten.topk.default, aten.sort.default) else 0
        dims = [cast(int, node.args[index] if len(node.args) > index else node.kwargs.get("dim", default))]
    reduced = {d % rank for d in dims}
    return "" if in_dim not in reduced else f"{target} along the token dimension"


def _prod(sizes: Any) -> sympy.Expr:
    return sympy.expand(math.prod(_size(s) for s in sizes))


def _size(size: Any) -> sympy.Expr | int:
    symbol = symbol_of(size)
    return symbol if symbol is not None else int(size)


def _numel(value: Any) -> sympy.Expr | int:
    if not isinstance(value, torch.Tensor):
        return 0
    return _prod(value.shape) * value.element_size()


def _flops(node: Node) -> sympy.Expr | int:
    if node.op != "call_function" or op_class(node) != "gemm":
        return 0
    operands = node.args[:2] if node.target is aten._scaled_mm.default else node.args[-2:]
    a, b = cast(Node, operands[0]).meta["val"], cast(Node, operands[1]).meta["val"]
    return sympy.expand(2 * _prod(a.shape) * _prod(b.shape[-1:]))  # 2 * (batch * M * K) * N


def _bytes(node: Node) -> sympy.Expr | int:
    if node.op != "call_function" or node.target in _VIEWS or node.target in _LAYOUT - {aten.clone.default,
                                                                                         aten._to_copy.default}:
        return 0
    val = node.meta.get("val")
    outs = val if isinstance(val, (tuple, list)) else [val]
    total = sum((_numel(o) for o in outs), sympy.Integer(0))
    return sympy.expand(total + sum((_numel(a.meta.get("val")) for a in node.all_input_nodes), sympy.Integer(0)))

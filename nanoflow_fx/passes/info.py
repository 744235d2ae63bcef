"""The record `annotate` writes under `node.meta["nanoflow"]`, and op classification helpers."""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch
from torch.fx import Node

from nanoflow_fx.ops import paged_attention

__all__ = ["NodeInfo", "META_KEY", "info", "set_info", "token_dims", "symbol_of", "ATTENTION_OP"]

META_KEY = "nanoflow"
ATTENTION_OP = paged_attention._opoverload  # the op the capture emits
aten = torch.ops.aten

GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
            aten._scaled_mm.default}
if hasattr(aten, "_grouped_mm"):
    GEMM_OPS.add(aten._grouped_mm.default)
COLLECTIVE_NAMESPACES = {"_c10d_functional", "c10d_functional", "c10d"}


@dataclass(frozen=True)
class NodeInfo:
    """What `annotate` learned of one node.

    token_dim: the output's token dimension (None for outputs without one, and for SymInt values).
    token_dependent: the node's value depends on the step's tokens (else it is shared: weights, constants).
    token_parallel: each output token row depends only on the same input token rows (safe to split).
    """

    op_class: str  # "gemm" | "attention" | "collective" | "other"
    flops: sympy.Expr | int = 0  # as a function of the token-count symbol
    bytes: sympy.Expr | int = 0
    token_dim: int | None = None
    token_dependent: bool = False
    token_parallel: bool = False
    why_not_parallel: str = ""


def info(node: Node) -> NodeInfo:
    record = node.meta.get(META_KEY)
    if not isinstance(record, NodeInfo):
        raise KeyError(f"node {node.name} has no nanoflow annotation; run the annotate pass first")
    return record


def set_info(node: Node, **changes: Any) -> None:
    node.meta[META_KEY] = replace(info(node), **changes) if META_KEY in node.meta else NodeInfo(**changes)


def op_class(node: Node) -> str:
    target = node.target
    if target is ATTENTION_OP:
        return "attention"
    if target in GEMM_OPS:
        return "gemm"
    namespace = getattr(target, "namespace", None)
    if namespace in COLLECTIVE_NAMESPACES:
        return "collective"
    return "other"


def symbol_of(value: Any) -> sympy.Expr | None:
    """The sympy expression of a SymInt (None for plain ints and non-integers)."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return None


def token_dims(value: Any, token: sympy.Expr) -> list[int]:
    """Dimensions of a tensor value whose size is exactly the token count."""
    if not isinstance(value, torch.Tensor):
        return []
    return [d for d, size in enumerate(value.shape) if symbol_of(size) == token]


def is_getitem(node: Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem

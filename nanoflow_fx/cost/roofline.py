"""The roofline cost of a nano-op: max(FLOPs / peak, bytes / bandwidth) from the annotate pass's counts.

A prediction without measurement (`explain()` draws its timeline with it); the schedule search measures instead
(`cost.search`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from nanoflow_fx.passes import info
from nanoflow_fx.runtime.nanobatch import NanobatchRunner, ScheduledStep
from nanoflow_fx.schedule import NanoOp

__all__ = ["RooflineCost", "roofline_cost"]


@dataclass(frozen=True)
class RooflineCost:
    """Predicted nano-op time: each node takes max(FLOPs / peak, bytes / bandwidth). Attention's KV reads depend
    on the step's context lengths, unknown to the graph, so its prediction counts only its q/k/v/out bytes;
    other step sizes (logits rows, requests, pages) are taken at their bound, the token count."""

    peak_flops: float = 729e12  # H100 bf16 8192^3 matmul, measured with torch 2.11
    bandwidth: float = 2.97e12  # H100 device-to-device copy, bytes read + written, measured


def roofline_cost(step: ScheduledStep, runner: NanobatchRunner, cost: RooflineCost):  # type: ignore[no-untyped-def]
    """Per nano-op predicted microseconds of `step` (a split step of `runner`) under `cost`, for `simulate`."""
    per_token: dict[str, tuple[sympy.Expr, sympy.Expr]] = {}
    for node in runner.graph.graph.nodes:
        group = info(node).group if node.op == "call_function" else None
        if group is not None:
            flops, data = per_token.get(group, (sympy.Integer(0), sympy.Integer(0)))
            per_token[group] = (flops + info(node).flops, data + info(node).bytes)

    def cost_us(op: NanoOp) -> float:
        start, end = step.schedule.token_range(op.group, op.nanobatch)
        flops, data = per_token.get(op.group, (0, 0))
        # Other sizes (logits rows, requests, pages) are bounded by the token count: take that bound.
        values = [float(sympy.sympify(e).subs({sym: end - start for sym in sympy.sympify(e).free_symbols}))
                  for e in (flops, data)]
        return max(values[0] / cost.peak_flops, values[1] / cost.bandwidth) * 1e6

    return cost_us

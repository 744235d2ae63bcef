"""`explain(model)`: what nanoflow_fx did to a model: graph, groups, plan, schedule, timeline, passes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import sympy
from transformers import PreTrainedModel

from nanoflow_fx.passes import NanobatchPlan, PassRecord, info
from nanoflow_fx.runtime.nanobatch import NanobatchRunner, ScheduledStep
from nanoflow_fx.schedule import NanoOp, format_schedule, format_timeline, simulate

__all__ = ["Explanation", "explain", "RooflineCost"]


@dataclass(frozen=True)
class RooflineCost:
    """Predicted nano-op time: each node takes max(FLOPs / peak, bytes / bandwidth). Attention's KV reads depend
    on the step's context lengths, unknown to the graph, so its prediction counts only its q/k/v/out bytes;
    other step sizes (logits rows, requests, pages) are taken at their bound, the token count."""

    peak_flops: float = 729e12  # H100 bf16 8192^3 matmul, measured with torch 2.11
    bandwidth: float = 2.97e12  # H100 device-to-device copy, bytes read + written, measured


@dataclass(frozen=True)
class Explanation:
    model: str
    op_counts: dict[str, int]
    groups: tuple[str, ...]
    splittable: tuple[str, ...]
    plan: NanobatchPlan
    schedule_text: str
    timeline: str
    passes: tuple[PassRecord, ...]

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        whole = [g for g in self.groups if g not in self.splittable]
        splits = "; ".join(f"{name} {list(s.boundaries)}" for name, s in self.plan.splits) or "none"
        passes = "\n".join(f"  {r.name:<18} {r.num_nodes:>6} nodes {r.seconds * 1e3:8.1f} ms" for r in self.passes)
        return "\n".join([
            f"nanoflow_fx: {self.model}",
            f"captured graph ops by class: {counts}",
            f"op groups ({len(self.groups)}): {' '.join(self.groups)}",
            f"groups kept whole (they mix tokens): {' '.join(whole) or 'none'}",
            f"plan for {self.plan.num_tokens} tokens: splits {splits}",
            "passes:", passes,
            "schedule:", self.schedule_text.rstrip(),
            "predicted timeline (roofline; attention without its KV reads):", self.timeline,
        ])


def explain(model: PreTrainedModel, num_tokens: int | None = None, cost: RooflineCost | None = None) -> Explanation:
    """Explain an optimized model's step at `num_tokens` tokens (default: its last step's, else 256)."""
    runtime = getattr(model, "nanoflow", None)
    if runtime is None or not runtime.step_fn.graphs:
        raise ValueError("explain() needs a model returned by nanoflow_fx.optimize() (with check_capture on, or "
                         "after one generate() call, so that a step has been captured)")
    gm = runtime.step_fn.graphs[-1]
    count = runtime.config.num_nanobatches
    runner = NanobatchRunner(gm, count if isinstance(count, int) else 1)
    if num_tokens is None:
        program = gm.meta.get("nanoflow_program_runner")
        last = program.last_schedule if program is not None else None
        num_tokens = last.num_tokens if last is not None else 256
    step = runner.scheduled(num_tokens)
    counts = Counter(info(n).op_class for n in gm.graph.nodes if n.op == "call_function")
    groups = tuple(dict.fromkeys(g.name for g in step.schedule.groups))
    timeline = format_timeline(simulate(step.schedule, _roofline(step, runner, cost or RooflineCost())))
    return Explanation(type(model).__name__, dict(counts), groups, tuple(runner.splittable), step.plan,
                       format_schedule(step.schedule), timeline, step.records)


def _roofline(step: ScheduledStep, runner: NanobatchRunner, cost: RooflineCost):  # type: ignore[no-untyped-def]
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

"""`NanobatchRunner`: the captured step run as nano-batches, by the passes' split graph and Schedule.

This is the op-level view of nano-batching: every node of the captured graph copied per nano-batch
(`passes.split_nanobatches`), placed on units (`passes.assign_units`) and interpreted node by node. It defines what
splitting means op by op (the property tests run it) and is what `explain()` shows; the runtime runs the same
cut at piece level (`capture.program` + `runtime.program_runner`: Inductor pieces between attention calls).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from nanoflow_fx.ops.split_metadata import split_attention_metadata
from nanoflow_fx.passes import (
    METADATA_FIELDS,
    NanobatchPlan,
    PassRecord,
    UnitPolicy,
    annotate,
    assign_units,
    group_ops,
    run_passes,
    split_nanobatches,
    splittable_groups,
    token_symbol,
)
from nanoflow_fx.passes.info import ATTENTION_OP, token_dims
from nanoflow_fx.runtime.schedule_executor import ScheduleExecutor
from nanoflow_fx.schedule import Schedule, Split

__all__ = ["NanobatchRunner", "ScheduledStep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledStep:
    """One token count's split graph, its Schedule, the executor and the pass records."""

    plan: NanobatchPlan
    graph: GraphModule
    schedule: Schedule
    executor: ScheduleExecutor
    records: tuple[PassRecord, ...]


class NanobatchRunner:
    """Callable with the captured graph's inputs. Splits each step into `num_nanobatches` even nano-batches
    (fewer when the step has fewer tokens) of every token-parallel group, and runs the Schedule on the CPU.
    Split graphs are built once per token count and cached."""

    def __init__(
        self,
        gm: GraphModule,
        num_nanobatches: int,
        policy: UnitPolicy | None = None,
        boundaries: Callable[[int], tuple[int, ...]] | None = None,
    ) -> None:
        """`boundaries(num_tokens)` overrides the even split (tests use it to cut anywhere). Nano-ops run in the
        Schedule's order on the current stream."""
        self.num_nanobatches, self.policy, self.boundaries = num_nanobatches, policy, boundaries
        self.graph, records = run_passes(gm, [("annotate", annotate), ("group_ops", group_ops)])
        self.records = tuple(records)
        self.splittable = splittable_groups(self.graph)
        placeholders = list(self.graph.graph.find_nodes(op="placeholder"))
        attention = next(iter(self.graph.graph.find_nodes(op="call_function", target=ATTENTION_OP)), None)
        if attention is None:
            raise ValueError("the captured step has no nanoflow attention op: nothing to split nano-batches by")
        token = token_symbol(self.graph)
        self.token_input = next(i for i, p in enumerate(placeholders) if token_dims(p.meta.get("val"), token))
        self.metadata_inputs = [placeholders.index(a) for a in attention.args[4:8]]  # type: ignore[arg-type]
        self.cache_input = placeholders.index(attention.args[3])  # type: ignore[arg-type]
        self.steps: dict[NanobatchPlan, ScheduledStep] = {}
        self.last: ScheduledStep | None = None

    def plan_for(self, num_tokens: int) -> NanobatchPlan:
        if self.boundaries is not None:
            return NanobatchPlan.uniform(self.splittable, self.boundaries(num_tokens))
        split = Split.even(num_tokens, min(self.num_nanobatches, num_tokens))
        return NanobatchPlan.uniform(self.splittable, split.boundaries)

    def scheduled(self, num_tokens: int) -> ScheduledStep:
        """The split graph and Schedule for a step of `num_tokens` tokens (built once per plan)."""
        plan = self.plan_for(num_tokens)
        if plan not in self.steps:
            graph, records = run_passes(self.graph, [("split_nanobatches", lambda g: split_nanobatches(g, plan))])
            schedule = assign_units(graph, self.policy)
            self.steps[plan] = ScheduledStep(plan, graph, schedule, ScheduleExecutor(graph, schedule),
                                             (*self.records, *records[1:]))
        return self.steps[plan]

    def __call__(self, *args: Any) -> Any:
        tokens = args[self.token_input]
        step = self.scheduled(tokens.shape[0])
        self.last = step
        return step.executor(*args, *self._nanobatch_metadata(step, args))

    def _nanobatch_metadata(self, step: ScheduledStep, args: tuple[Any, ...]) -> list[torch.Tensor]:
        page_size = args[self.cache_input].shape[2]  # the cache this step runs on (a static size)
        return self._split(step, [args[i] for i in self.metadata_inputs], page_size, None)

    def _split(self, step: ScheduledStep, metadata: list[torch.Tensor], page_size: int,
               pad: tuple[int, int] | None, pin: bool = False) -> list[torch.Tensor]:
        per_split = {name: split_attention_metadata(*metadata, page_size, split.boundaries, pad=pad, pin=pin)
                     for name, split in step.plan.splits}
        wanted = step.graph.meta["nanoflow_extra_inputs"]
        return [t for name, i in wanted for t in per_split[name][i][: len(METADATA_FIELDS)]]

"""The lowering: one ordered list of FX passes from the captured step to what runs, and the record of a capture.

Every configuration lowers the step the same way:

    Dynamo's graph --[dynamo passes]--> AOT --> ATen graph --[replicate]--[aten passes]--> annotate
        --> `capture.program.lower_program` (pieces between attention calls; Inductor-compiled with `inductor`)
        --> `runtime.program_runner.ProgramRunner` (whole steps, or cut into nano-batches by a Schedule)

`Lowering` is that list for one `NanoFlowConfig`: its passes (the check of a tensor-parallel rank's collectives,
linear fusion, then FP8 linears) and whether Inductor compiles the pieces. Its `key` is what the saved step and the
cost table are keyed by (with the model, device and versions): a new pass changes the key, so nothing measured or
saved for another lowering is reused. How a step is cut into nano-batches is not part of the lowering: the cut is
chosen per step at run time (`StepRunner.split_policy`), so one saved step serves every nano-batch count.

`Capture` records one captured graph: the ATen graph, the program and its runner, each pass's node counts and
time, the compile stages' times and the layer replication. The step function keeps one per graph it captured.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

__all__ = ["Capture", "GraphPass", "Lowering", "PassRun", "lowering_for"]

PassFn = Callable[[GraphModule, Sequence[Any]], int]
"""A pass: changes the graph in place (given its example inputs) and returns how many things it changed."""

STAGES = ("dynamo", "aten")


@dataclass(frozen=True)
class GraphPass:
    """One FX pass of the lowering. `stage`: "dynamo" runs on Dynamo's torch-level graph before AOT (it sees
    module calls and parameters: a pass that changes weights' use, like linear fusion, goes there), "aten" on the
    ATen graph AOT traced (after layer replication). `params`: what the pass's result depends on besides the
    graph (part of the lowering's key)."""

    name: str
    stage: str
    run: PassFn = field(compare=False, repr=False)
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"pass {self.name!r}: stage must be one of {STAGES}, not {self.stage!r}")


@dataclass(frozen=True)
class Lowering:
    """The ordered passes of one configuration and whether Inductor compiles the program's dense pieces."""

    passes: tuple[GraphPass, ...] = ()
    inductor: bool = False

    def stage(self, stage: str) -> tuple[GraphPass, ...]:
        return tuple(p for p in self.passes if p.stage == stage)

    @property
    def key(self) -> str:
        """What a lowered step depends on of the lowering: the passes in order (names, stages, parameters) and
        Inductor, hashed."""
        parts = dict(passes=[[p.name, p.stage, [list(kv) for kv in p.params]] for p in self.passes],
                     inductor=self.inductor)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> str:
        names = [p.name for p in self.passes] + ["annotate", "lower (Inductor)" if self.inductor else "lower"]
        return " -> ".join(names)


FP8_FAST_ACCUM = True
"""`torch._scaled_mm`'s fast accumulation in the FP8 linears (what vLLM's and torch's row-wise FP8 GEMMs use for
w8a8 serving); its cost in accuracy is measured by `benchmarks/bench_fp8_linear.py`."""


def lowering_for(config: Any, tensor_parallel: Any = None) -> Lowering:
    """The lowering a resolved `NanoFlowConfig` asks for (`inductor` already True or False; `linear_dtype`
    "fp8_e4m3" where the model's linears are FP8); with a `capture.tensor_parallel.TensorParallel` record, the step
    of that rank (its collectives checked, its rank, world, plan and group in the key)."""
    from functools import partial

    from nanoflow_fx.capture.fp8_linears import lower_fp8_linears
    from nanoflow_fx.capture.fuse_linears import fuse_parallel_linears

    passes = []
    if tensor_parallel is not None:
        from nanoflow_fx.capture.tensor_parallel import check_collectives

        passes.append(GraphPass("tensor_parallel", "dynamo", check_collectives,
                                tuple(sorted(tensor_parallel.key.items()))))
    if config.fuse_linears:
        passes.append(GraphPass("fuse_linears", "dynamo", fuse_parallel_linears))
    if config.linear_dtype == "fp8_e4m3":  # after the fusion: one quantisation and one FP8 GEMM per fused group
        passes.append(GraphPass("fp8_linears", "dynamo", partial(lower_fp8_linears, use_fast_accum=FP8_FAST_ACCUM),
                                params=(("use_fast_accum", FP8_FAST_ACCUM), ("activations", "per_token"))))
    return Lowering(tuple(passes), inductor=config.inductor is True)


@dataclass(frozen=True)
class PassRun:
    """One pass as it ran on a captured graph: node counts before and after, what it changed, its time."""

    name: str
    nodes_before: int
    nodes_after: int
    changed: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.name:<16} {self.nodes_before:>6} -> {self.nodes_after:<6} nodes, {self.changed:>4} changed, "
                f"{self.seconds * 1e3:8.1f} ms")


def run_pass(graph_pass: GraphPass | tuple[str, PassFn], gm: GraphModule, inputs: Sequence[Any]) -> PassRun:
    """Run one pass on `gm` in place (lint and recompile after it) and record it."""
    name, fn = (graph_pass.name, graph_pass.run) if isinstance(graph_pass, GraphPass) else graph_pass
    before, start = len(gm.graph.nodes), time.perf_counter()
    changed = fn(gm, inputs)
    gm.graph.lint()
    gm.recompile()
    return PassRun(name, before, len(gm.graph.nodes), int(changed or 0), time.perf_counter() - start)


@dataclass
class Capture:
    """One graph the step function captured and what the lowering made of it."""

    graph: GraphModule  # the ATen graph the program was lowered from
    program: Any = None  # `capture.program.StepProgram`
    runner: Any = None  # `runtime.program_runner.ProgramRunner`: what runs
    passes: list[PassRun] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)  # when each compile stage ended (perf_counter)
    replicated: tuple[int, int, int] | None = None  # (layers traced, layers in all, period) when replicated

    def changed(self, name: str) -> int:
        """What the pass `name` changed on this graph (0 if it did not run)."""
        return sum(r.changed for r in self.passes if r.name == name)

"""The nanoflow torch.compile backend: Dynamo's graph -> ATen (mutation kept in place) -> the lowered program."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._functorch.aot_autograd import aot_module_simplified

from nanoflow_fx.capture.lowering import Capture, Lowering, PassRun, run_pass
from nanoflow_fx.capture.store import source_name

__all__ = ["CaptureSink", "Expand", "LoweredSink", "make_backend"]

log = logging.getLogger(__name__)

CaptureSink = Callable[[Capture], None]
LoweredSink = Callable[[list[str | None], Sequence[Any], Any, Capture], None]
"""(Dynamo's source of each input, Dynamo's example inputs, what runs, the capture): see `make_backend`."""
Expand = Callable[[torch.fx.GraphModule, list[str | None]], tuple[list[str], list[Any], list[Any]]]
"""Extends the ATen graph in place before it is lowered (`capture.replicate`): (graph, sources) -> the sources,
Dynamo-level values and AOT-level (fake) values of the inputs it added."""


_NOT_RUN = torch.empty(0)  # what a trace-only call returns


def _annotate(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> int:
    """The `annotate` pass (`passes.annotate`); returns how many nodes mix tokens (kept whole in any cut)."""
    from nanoflow_fx.passes.annotate import annotate
    from nanoflow_fx.passes.info import info

    annotate(gm)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and info(n).token_dependent
               and not info(n).token_parallel)


def make_backend(
    lowering: Lowering, on_capture: CaptureSink | None = None, on_lowered: LoweredSink | None = None,
    skip_run: Callable[[], bool] | None = None, expand: Expand | None = None,
) -> Callable[..., Any]:
    """Return a `torch.compile` backend that lowers each captured graph by `lowering` and runs it.

    Functionalisation is disabled and input mutations are kept in the graph on purpose: the attention op
    declares its KV-cache write (`mutates_args`), so the write stays in place; a functionalised graph would
    instead copy the whole cache and `copy_` it back every step. The lowering's "dynamo" passes run on Dynamo's
    graph, AOT traces it to ATen (decomposed with Inductor's table when Inductor compiles the pieces), `expand`
    extends the ATen graph (the replicated layers of `capture.replicate`), the "aten" passes run, and the graph is
    lowered to a `capture.program.StepProgram` run by a `runtime.program_runner.ProgramRunner`: what runs.
    `on_capture` receives each capture's record (`Capture`: the ATen graph, the program, the passes' node counts
    and times); `on_lowered` receives, once lowered, how each input is read off the call (Dynamo's source
    expressions, as `capture.store` persists them), Dynamo's example inputs, what runs, and the capture. While
    `skip_run()` is true, calls of the compiled step return without running it (a trace-only call: see
    `StepFunction.trace`).
    """

    def compile_fn(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        # When each stage ended (perf_counter): Dynamo's trace (on entry here), the Dynamo-level passes, AOT's
        # trace to ATen, replication, lowering (Inductor pieces); `Capture.times` keeps them.
        times = {"dynamo": time.perf_counter()}
        sources = [source_name(n) for n in gm.graph.find_nodes(op="placeholder")]
        runs = [run_pass(p, gm, example_inputs) for p in lowering.stage("dynamo")]
        times["fx_passes"] = time.perf_counter()

        def compile_aten(aten_gm: torch.fx.GraphModule, aten_inputs: Sequence[Any]) -> Any:
            from nanoflow_fx.capture.program import lower_program
            from nanoflow_fx.runtime.program_runner import ProgramRunner

            times["aot"] = time.perf_counter()
            capture = Capture(aten_gm, passes=runs, times=times)
            inputs, graph_sources = list(example_inputs), list(sources)
            if expand is not None:
                added, values, fakes = expand(aten_gm, graph_sources)
                graph_sources, inputs, aten_inputs = [*graph_sources, *added], inputs + values, [*aten_inputs, *fakes]
                times["replicate"] = time.perf_counter()
            aten_gm.graph.eliminate_dead_code()
            aten_gm.recompile()
            capture.passes += [run_pass(p, aten_gm, aten_inputs) for p in lowering.stage("aten")]
            log.debug("nanoflow captured an ATen graph with %d nodes", len(aten_gm.graph.nodes))
            capture.passes.append(run_pass(("annotate", _annotate), aten_gm, aten_inputs))
            before, start = len(aten_gm.graph.nodes), time.perf_counter()
            capture.program = lower_program(aten_gm, aten_inputs, lowering.inductor)
            capture.passes.append(PassRun("lower", before, len(capture.program.pieces), capture.program.compiles,
                                          time.perf_counter() - start))
            capture.runner = lowered = ProgramRunner(capture.program)
            times["lower"] = time.perf_counter()
            if on_capture is not None:
                on_capture(capture)
            if on_lowered is not None:
                on_lowered(graph_sources, inputs, lowered, capture)
            if skip_run is None:
                return lowered
            run = lowered
            return lambda *args: (_NOT_RUN,) if skip_run() else run(*args)

        decompositions = None
        if lowering.inductor:
            from torch._inductor.decomposition import select_decomp_table

            decompositions = select_decomp_table()
        # (AOTDispatchCompiler names its parameters gm, example_inputs; AOT calls the compiler positionally)
        return aot_module_simplified(
            gm, list(example_inputs), fw_compiler=compile_aten,  # type: ignore[arg-type]
            decompositions=decompositions,
            disable_functionalization=True, keep_inference_input_mutations=True,
        )

    return compile_fn

"""The nanoflow torch.compile backend: Dynamo's graph -> one ATen-level FX graph, mutation kept in place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._functorch.aot_autograd import aot_module_simplified

from nanoflow_fx.capture.fuse_linears import fuse_parallel_linears
from nanoflow_fx.capture.store import source_name

__all__ = ["make_backend", "GraphSink", "Lower"]

log = logging.getLogger(__name__)

GraphSink = Callable[[torch.fx.GraphModule], None]
Lower = Callable[[torch.fx.GraphModule], Callable[..., Any]]
LoweredSink = Callable[[list[str | None], Sequence[Any], Any, torch.fx.GraphModule], None]
"""(Dynamo's source of each input, Dynamo's example inputs, what runs, the ATen graph): see `make_backend`."""
Expand = Callable[[torch.fx.GraphModule, list[str | None]], tuple[list[str], list[Any], list[Any]]]
"""Extends the ATen graph in place before it is lowered (`capture.replicate`): (graph, sources) -> the sources,
Dynamo-level values and AOT-level (fake) values of the inputs it added."""


_NOT_RUN = torch.empty(0)  # what a trace-only call returns


def make_backend(
    lower: Lower | None = None, on_graph: GraphSink | None = None, inductor: bool = False,
    fuse_linears: bool = False, program: Callable[[Any], Callable[..., Any]] | None = None,
    on_lowered: LoweredSink | None = None, skip_run: Callable[[], bool] | None = None,
    expand: Expand | None = None,
) -> Callable[..., Any]:
    """Return a `torch.compile` backend that lowers each captured graph to ATen and runs it.

    Functionalisation is disabled and input mutations are kept in the graph on purpose: the attention op
    declares its KV-cache write (`mutates_args`), so the write stays in place; a functionalised graph would
    instead copy the whole cache and `copy_` it back every step. `on_graph` receives every ATen GraphModule
    (for `explain()` and the passes); `lower` turns it into what runs (default: the GraphModule itself, the
    single-stream in-order program). With `inductor` the graph is decomposed with Inductor's table and its
    attention-free pieces are compiled by Inductor (`piecewise.compile_pieces`; `lower` must be None then).
    With `fuse_linears`, linears sharing an input whose weights lie adjacent in memory (see
    `fuse_linears.relayout_parallel_linears`) are merged first into one GEMM each; the ATen graph's
    `meta["nanoflow_fused_linears"]` says how many groups were merged. With `program`, the graph is lowered to
    a `capture.program.StepProgram` (pieces between attention calls, Inductor-compiled with `inductor`) and
    `program(step_program)` is what runs (e.g. a nano-batching `runtime.program_runner.ProgramRunner`).
    `on_lowered` receives, once lowered, how each input is read off the call (Dynamo's source expressions, as
    `capture.store` persists them), Dynamo's example inputs, what runs, and the ATen graph. While `skip_run()`
    is true, calls of the compiled step return without running it (a trace-only call: see `StepFunction.trace`).
    `expand` extends the ATen graph before anything else sees it (the replicated layers of `capture.replicate`).
    """
    if inductor and lower is not None:
        raise ValueError("inductor=True compiles the whole step itself; it takes no `lower`")

    def compile_fn(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        # When each stage ended (perf_counter): Dynamo's trace (on entry here), our FX passes, AOT's trace to ATen,
        # lowering (Inductor pieces); the captured graph's meta["nanoflow_compile_times"] keeps them.
        times = {"dynamo": time.perf_counter()}
        sources = [source_name(n) for n in gm.graph.find_nodes(op="placeholder")]
        fused = fuse_parallel_linears(gm, example_inputs) if fuse_linears else 0
        times["fx_passes"] = time.perf_counter()

        def compile_aten(aten_gm: torch.fx.GraphModule, aten_inputs: Sequence[Any]) -> Any:
            times["aot"] = time.perf_counter()
            inputs, graph_sources = list(example_inputs), list(sources)
            if expand is not None:
                added, values, fakes = expand(aten_gm, graph_sources)
                graph_sources, inputs, aten_inputs = graph_sources + added, inputs + values, [*aten_inputs, *fakes]
                times["replicate"] = time.perf_counter()
            aten_gm.meta["nanoflow_compile_times"] = times
            aten_gm.meta["nanoflow_fused_linears"] = fused  # groups of linears merged into one GEMM
            aten_gm.graph.eliminate_dead_code()
            aten_gm.recompile()
            log.debug("nanoflow captured an ATen graph with %d nodes", len(aten_gm.graph.nodes))
            if on_graph is not None:
                on_graph(aten_gm)
            if program is not None:
                from nanoflow_fx.capture.program import lower_program

                step_program = lower_program(aten_gm, aten_inputs, inductor)
                aten_gm.meta["nanoflow_program"] = step_program
                aten_gm.meta["nanoflow_inductor_compiles"] = step_program.compiles
                lowered = program(step_program)
                aten_gm.meta["nanoflow_program_runner"] = lowered  # explain() and tests find it here
            elif inductor:
                from nanoflow_fx.capture.piecewise import compile_pieces

                lowered = compile_pieces(aten_gm, aten_inputs)
            else:
                lowered = lower(aten_gm) if lower is not None else aten_gm
            times["lower"] = time.perf_counter()
            if on_lowered is not None:
                on_lowered(graph_sources, inputs, lowered, aten_gm)
            if skip_run is None:
                return lowered
            run = lowered
            return lambda *args: (_NOT_RUN,) if skip_run() else run(*args)

        decompositions = None
        if inductor:
            from torch._inductor.decomposition import select_decomp_table

            decompositions = select_decomp_table()
        return aot_module_simplified(
            gm, list(example_inputs), fw_compiler=compile_aten, decompositions=decompositions,
            disable_functionalization=True, keep_inference_input_mutations=True,
        )

    return compile_fn

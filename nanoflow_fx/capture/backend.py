"""The nanoflow torch.compile backend: Dynamo's graph -> one ATen-level FX graph, mutation kept in place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._functorch.aot_autograd import aot_module_simplified

__all__ = ["make_backend", "GraphSink", "Lower"]

log = logging.getLogger(__name__)

GraphSink = Callable[[torch.fx.GraphModule], None]
Lower = Callable[[torch.fx.GraphModule], Callable[..., Any]]


def make_backend(lower: Lower | None = None, on_graph: GraphSink | None = None) -> Callable[..., Any]:
    """Return a `torch.compile` backend that lowers each captured graph to ATen and runs it.

    Functionalisation is disabled and input mutations are kept in the graph on purpose: the attention op
    declares its KV-cache write (`mutates_args`), so the write stays in place; a functionalised graph would
    instead copy the whole cache and `copy_` it back every step. `on_graph` receives every ATen GraphModule
    (for `explain()` and the passes); `lower` turns it into what runs (default: the GraphModule itself, the
    single-stream in-order program).
    """

    def compile_fn(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        def compile_aten(aten_gm: torch.fx.GraphModule, aten_inputs: Sequence[Any]) -> Any:
            aten_gm.graph.eliminate_dead_code()
            aten_gm.recompile()
            log.debug("nanoflow captured an ATen graph with %d nodes", len(aten_gm.graph.nodes))
            if on_graph is not None:
                on_graph(aten_gm)
            return lower(aten_gm) if lower is not None else aten_gm

        return aot_module_simplified(
            gm, list(example_inputs), fw_compiler=compile_aten, disable_functionalization=True,
            keep_inference_input_mutations=True,
        )

    return compile_fn

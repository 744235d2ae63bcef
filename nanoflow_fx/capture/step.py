"""`StepFunction`: the model's forward over one token-packed step, captured by Dynamo with `fullgraph=True`."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture.backend import GraphSink
from nanoflow_fx.capture.hf_attention import METADATA_KWARG
from nanoflow_fx.ops import AttentionMetadata

__all__ = ["StepFunction"]


class StepFunction:
    """Calls `model(input_ids [1, T], position_ids [1, T], ...)` through the nanoflow backend.

    The ids and positions are given as [T] and unsqueezed inside the graph.

    Returns the logits of the rows `logits_indices` selects: [len(logits_indices), vocab].
    Every ATen graph captured (one per distinct shape specialisation Dynamo makes) lands in `graphs`.
    """

    def __init__(self, model: PreTrainedModel, make_backend: Callable[[GraphSink], Any]) -> None:
        """`make_backend(on_graph)` returns the torch.compile backend to capture with."""
        self.model = model
        self.graphs: list[torch.fx.GraphModule] = []
        self.compile_seconds = 0.0  # wall time of the calls that captured (and compiled) a new graph
        self.compile_breakdown: dict[str, float] = {}  # of which Dynamo, our FX passes, AOT, lowering (seconds)
        # A private copy of the code object gives this model its own Dynamo cache and recompile limit;
        # otherwise every optimized model in the process would share (and evict) one cache.
        fn = types.FunctionType(_packed_forward.__code__.replace(), _packed_forward.__globals__, "nanoflow_step")
        # dynamic=False: only the sizes marked dynamic in `__call__` are symbolic. Without it Dynamo's automatic
        # dynamism (and its profile persisted across processes) turns values it saw change in other models'
        # compiles, such as a norm's eps, into graph inputs: the graph would depend on what ran before.
        self._compiled = torch.compile(fn, backend=make_backend(self.graphs.append), fullgraph=True, dynamic=False,
                                       options={"guard_filter_fn": _drop_registry_guards})

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        logits_indices: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [N, vocab]
        # The step's sizes (tokens, requests, pages used, logits rows) are symbolic; the builder keeps each >= 2
        # so Dynamo never specialises them on 0/1. The KV caches and weights keep static shapes.
        for tensor in (input_ids, position_ids, logits_indices, *metadata.tensors()):
            torch._dynamo.mark_dynamic(tensor, 0)
        for cache in metadata.kv_caches:  # its page count: optimize() sizes the cache after the first capture
            torch._dynamo.mark_dynamic(cache, 0)
        # Without duck sizing, sizes that happen to be equal in one step (say 8 tokens and 8 pages) are not
        # unified into one symbol, which would force a recompile the first step they differ.
        seen, start = len(self.graphs), time.perf_counter()
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            out = self._compiled(self.model, input_ids, position_ids, logits_indices, metadata)
        if len(self.graphs) != seen:
            end = time.perf_counter()
            self.compile_seconds += end - start
            marks = self.graphs[-1].meta.get("nanoflow_compile_times", {})
            previous = start
            for stage in ("dynamo", "fx_passes", "aot", "lower"):
                if stage in marks:
                    self.compile_breakdown[f"{stage}_s"] = self.compile_breakdown.get(f"{stage}_s", 0.0) + (
                        marks[stage] - previous)
                    previous = marks[stage]
        return out  # type: ignore[no-any-return]


def _drop_registry_guards(guards: list[Any]) -> list[bool]:
    """Keep every Dynamo guard but those on transformers' process-wide `_CAN_RECORD_REGISTRY`.

    transformers (5.2x) registers each model class there on first use, and Dynamo guards on the registry's
    length, so loading any other model class would recompile every captured step. Our model's own entry
    (all the traced code reads) never changes, so that guard cannot protect anything we depend on.
    """
    return ["_CAN_RECORD_REGISTRY" not in guard.name for guard in guards]


def _packed_forward(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_indices: torch.Tensor, metadata: Any
) -> torch.Tensor:
    out = model(
        input_ids=input_ids.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        use_cache=False,
        logits_to_keep=logits_indices,
        **{METADATA_KWARG: metadata},
    )
    return out.logits[0]  # type: ignore[no-any-return]

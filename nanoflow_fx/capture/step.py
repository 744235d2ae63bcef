"""`StepFunction`: the model's forward over one token-packed step, captured by Dynamo with `fullgraph=True`."""

from __future__ import annotations

import logging
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture import replicate
from nanoflow_fx.capture.hf_attention import METADATA_KWARG
from nanoflow_fx.capture.lowering import Capture
from nanoflow_fx.capture.replicate import LayerStack
from nanoflow_fx.capture.store import LoadedStep, StepStore, cache_dtype_of, saved_step
from nanoflow_fx.ops import AttentionMetadata

__all__ = ["StepFunction"]

log = logging.getLogger(__name__)


class StepFunction:
    """Calls `model(input_ids [1, T], position_ids [1, T], ...)` through the nanoflow backend.

    The ids and positions are given as [T] and unsqueezed inside the graph.

    Returns the logits of the rows `logits_indices` selects: [len(logits_indices), vocab].
    Every graph captured (one per distinct shape specialisation Dynamo makes) lands in `captures`
    (`capture.lowering.Capture`: the ATen graph, its program, the passes that ran).

    With a `store` (`capture.store`), the first call loads the step saved there by an earlier process, if any,
    and runs it without Dynamo (`loaded`); otherwise the first capture is saved there once lowered.
    """

    def __init__(self, model: PreTrainedModel, make_backend: Callable[..., Any], store: StepStore | None = None,
                 stack: LayerStack | None = None) -> None:
        """`make_backend(on_capture, on_lowered, skip_run, expand=None)` returns the torch.compile backend to capture
        with. With a `stack`, the first capture traces its first layers only and replicates them
        (`capture.replicate`): `replicated` runs it; a call it does not serve goes through Dynamo."""
        # Weakly: the model holds its runtime (`model.nanoflow`), which holds this step; a strong reference back
        # would put the model in a reference cycle, so dropping it would free its KV cache and weights only when
        # the garbage collector next ran, not at once.
        self._model = weakref.ref(model)
        self.make_backend = make_backend
        self.stack = stack
        self.replicated: LoadedStep | None = None  # the step traced with `stack` truncated, then replicated
        self.captures: list[Capture] = []
        self.compile_seconds = 0.0  # wall time of the calls that captured (and compiled) a new graph
        self.compile_breakdown: dict[str, float] = {}  # of which Dynamo, our FX passes, AOT, lowering (seconds)
        self.store = store
        self.loaded: LoadedStep | None = None  # the saved step this process runs (see `store`)
        self._load_tried = store is None
        self._call: dict[str, Any] | None = None  # the call being captured (to check what is saved)
        self._trace_only = False
        # A private copy of the code object gives this model its own Dynamo cache and recompile limit;
        # otherwise every optimized model in the process would share (and evict) one cache.
        fn = types.FunctionType(_packed_forward.__code__.replace(), _packed_forward.__globals__, "nanoflow_step")
        # dynamic=False: only the sizes marked dynamic in `__call__` are symbolic. Without it Dynamo's automatic
        # dynamism (and its profile persisted across processes) turns values it saw change in other models'
        # compiles, such as a norm's eps, into graph inputs: the graph would depend on what ran before.
        compile_backend = make_backend(*self._weak_sinks())
        self._compiled = torch.compile(fn, backend=compile_backend, fullgraph=True, dynamic=False,
                                       options={"guard_filter_fn": _drop_registry_guards})

    @property
    def model(self) -> PreTrainedModel:
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this nanoflow step was deleted")
        return model

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        """The ATen graph of each capture."""
        return [c.graph for c in self.captures]

    @property
    def program(self) -> Any:
        """The lowered program (`capture.program.StepProgram`) of what runs: the loaded or replicated step, else
        the last capture (None before the first)."""
        direct = self.direct
        if direct is not None:
            return direct.graph.program
        return self.captures[-1].program if self.captures else None

    def _weak_sinks(self) -> tuple[Callable[..., None], Callable[..., None], Callable[[], bool]]:
        """(on_capture, on_lowered, skip_run) for a compile backend, reaching this object through a weak reference.

        Dynamo keeps what a backend returned (and what that closes over) in caches that the garbage collector
        cannot see into (a code object's extra state, the module globals it installs compiled functions in); a
        strong reference from there back to this step (and so to the model and its runtime, KV cache included)
        would keep them alive for the life of the process."""
        me = weakref.ref(self)

        def on_capture(capture: Capture) -> None:
            step = me()
            if step is not None:
                step.captures.append(capture)

        def on_lowered(*args: Any) -> None:
            step = me()
            if step is not None:
                step._save(*args)

        def skip_run() -> bool:
            step = me()
            return step is not None and step._trace_only

        return on_capture, on_lowered, skip_run

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        logits_indices: torch.Tensor,  # [N] int64
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [N, vocab]
        args = (input_ids, position_ids, logits_indices, metadata)
        direct = self._loaded_for(metadata)
        if direct is None and self.stack is not None and not self.graphs:
            self._trace_replicated(*args)
            direct = self._loaded_for(metadata)
        if direct is not None:
            return direct(self.model, *args)
        return self._dynamo(self._compiled, *args)

    def _dynamo(self, compiled: Callable[..., Any], input_ids: torch.Tensor, position_ids: torch.Tensor,
                logits_indices: torch.Tensor, metadata: AttentionMetadata) -> Any:
        """Call `compiled` (a torch.compile of the step) on the model, accounting for the time of a capture."""
        # The step's sizes (tokens, requests, pages used, logits rows) are symbolic; the builder keeps each >= 2
        # so Dynamo never specialises them on 0/1. The KV caches and weights keep static shapes.
        for tensor in (input_ids, position_ids, logits_indices, *metadata.tensors()):
            torch._dynamo.mark_dynamic(tensor, 0)
        for cache in metadata.kv_caches:  # its page count: optimize() sizes the cache after the first capture
            torch._dynamo.mark_dynamic(cache, 0)
        # Without duck sizing, sizes that happen to be equal in one step (say 8 tokens and 8 pages) are not
        # unified into one symbol, which would force a recompile the first step they differ.
        seen, start = len(self.captures), time.perf_counter()
        self._call = dict(model=self.model, input_ids=input_ids, position_ids=position_ids,
                          logits_indices=logits_indices, metadata=metadata)
        try:
            # (`patch` is installed on the config module at import: torch's install_config_module)
            with torch.fx.experimental._config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
                out = compiled(self.model, input_ids, position_ids, logits_indices, metadata)
        finally:
            self._call = None
        if len(self.captures) != seen:
            end = time.perf_counter()
            self.compile_seconds += end - start
            marks = self.captures[-1].times
            previous = start
            for stage in ("dynamo", "fx_passes", "aot", "replicate", "lower"):
                if stage in marks:
                    self.compile_breakdown[f"{stage}_s"] = self.compile_breakdown.get(f"{stage}_s", 0.0) + (
                        marks[stage] - previous)
                    previous = marks[stage]
        return out

    @torch.no_grad()
    def _trace_replicated(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_indices: torch.Tensor,
                          metadata: AttentionMetadata) -> None:
        """Trace the step with the layer stack cut to its first layers and replicate them (`capture.replicate`),
        without running it; `replicated` then runs it. On any failure, forget the attempt (the caller traces every
        layer)."""
        stack, self.stack = self.stack, None  # one attempt
        assert stack is not None
        # What the backend's callbacks need, dropped after this trace: Dynamo keeps the callbacks for the life of
        # the process (see `_weak_sinks`), and the stack holds the model's layers.
        state: dict[str, Any] = {"stack": stack, "lowered": []}
        on_capture, save, _ = self._weak_sinks()
        me = weakref.ref(self)

        def expand(aten_gm: torch.fx.GraphModule, sources: list[str | None]) -> tuple[list[str], list[Any], list[Any]]:
            step, stack = me(), state["stack"]
            call = step._call if step is not None else None

            def read(srcs: list[str]) -> list[Any]:
                with stack.whole():
                    return list(LoadedStep.reader(srcs)(call))

            added, templates, values = replicate.expand(stack, aten_gm, sources, read)
            return added, values, [p.meta.get("val") for p in templates]

        def on_lowered(sources: list[str | None], example_inputs: Any, run: Any, capture: Capture) -> None:
            state["lowered"].append((sources, run))
            with state["stack"].whole():  # its inputs are read off the whole model
                save(sources, example_inputs, run, capture)

        # Its own code object: the truncated model's compiled entry lives and dies with this function, never in the
        # cache `self._compiled` consults.
        fn = types.FunctionType(_packed_forward.__code__.replace(), _packed_forward.__globals__, "nanoflow_layers")
        backend = self.make_backend(on_capture, on_lowered, lambda: True, expand)
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False,
                                 options={"guard_filter_fn": _drop_registry_guards})
        seen = len(self.captures)
        try:
            with stack.truncated():
                self._dynamo(compiled, input_ids, position_ids, logits_indices, metadata)
        except Exception as e:  # noqa: BLE001 - replication is an optimisation: trace every layer instead
            del self.captures[seen:]
            reason = e.__cause__ if isinstance(e.__cause__, replicate.NotReplicable) else e
            log.info("nanoflow_fx: layers not replicated (%s: %s); tracing all %d", type(reason).__name__, reason,
                     stack.num_layers)
            return
        finally:
            lowered = state.pop("lowered")
            state.clear()
        if not lowered or len(self.captures) != seen + 1:
            del self.captures[seen:]
            return
        sources, run = lowered[-1]
        self.replicated = LoadedStep(run, sources, metadata.backend, len(metadata.kv_caches), cache_dtype_of(metadata))
        self.captures[-1].replicated = (stack.traced, stack.num_layers, stack.period)

    def trace(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_indices: torch.Tensor,
              metadata: AttentionMetadata) -> None:
        """Capture and lower the step for these inputs (or load it) without running it: nothing is read from or
        written to the KV cache, and the attention backend needs no plan. `optimize()` traces while FlashInfer
        builds its kernels."""
        if self.captures or self._loaded_for(metadata) is not None:
            return
        if self.stack is not None:
            self._trace_replicated(input_ids, position_ids, logits_indices, metadata)
            if self.replicated is not None:
                return
        self._trace_only = True
        try:
            self(input_ids, position_ids, logits_indices, metadata)
        finally:
            self._trace_only = False

    @contextmanager
    def bypassing_loaded(self) -> Iterator[None]:
        """Calls inside go through Dynamo even when a saved step is loaded (`explain()` needs a traced graph)."""
        loaded, self.loaded = self.loaded, None
        try:
            yield
        finally:
            self.loaded = loaded

    @property
    def direct(self) -> LoadedStep | None:
        """What runs without Dynamo: the step loaded from the store, or the replicated trace."""
        return self.loaded or self.replicated

    def discard_loaded(self) -> None:
        """Forget the loaded (or replicated) step and delete its file: the next call traces every layer (and saves
        the step) afresh."""
        if self.replicated is not None:
            self.captures.clear()
        self.loaded = self.replicated = None
        self.stack = None
        if self.store is not None:
            self.store.discard()

    def _loaded_for(self, metadata: AttentionMetadata) -> LoadedStep | None:
        """The saved step (loaded on the first call) or the replicated one, if it serves this call."""
        if not self._load_tried:
            self._load()
        return next((s for s in (self.loaded, self.replicated) if s is not None and s.accepts(metadata)), None)

    def _load(self) -> None:
        self._load_tried = True
        start = time.perf_counter()
        self.loaded = self.store.load() if self.store is not None else None
        if self.loaded is not None:
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            self.compile_breakdown["load_s"] = seconds

    def _save(self, sources: list[str | None], example_inputs: Any, lowered: Any, capture: Capture) -> None:
        """The backend's `on_lowered`: save the first step this function captures, if its inputs are read off the
        call by Dynamo's expressions exactly as Dynamo passed them (`capture.store`)."""
        call, store = self._call, self.store
        if store is None or call is None or self.captures[0] is not capture:  # only the first graph is saved
            return
        step = saved_step(sources, lowered, call["metadata"])
        if step is None:
            log.info("nanoflow_fx: this step cannot be saved (an input Dynamo gave no source, or a piece Inductor "
                     "compiled with opaque constants); it is traced in every process")
            return
        try:
            read = LoadedStep.reader(step.sources)(call)
            same = len(read) == len(example_inputs) and all(
                a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_tensor(a, b))
                or (not isinstance(a, torch.Tensor) and a == _hint(b)) for a, b in zip(read, example_inputs))
        except Exception as e:  # noqa: BLE001 - an expression that does not evaluate: do not save
            log.info("nanoflow_fx: this step's inputs cannot be read off a call (%s); it is not saved", e)
            return
        if not same:
            log.info("nanoflow_fx: Dynamo's inputs differ from what its sources read; the step is not saved")
            return
        try:
            store.save(step)
        except Exception as e:  # noqa: BLE001 - saving is an optimisation; a failure must not fail the step
            log.warning("nanoflow_fx: could not save the step to %s (%s: %s)", store.path, type(e).__name__, e)


def _hint(value: Any) -> Any:
    """A SymInt's value in this call, read without a guard (comparing the SymInt would specialise the graph)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


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
    return out.logits[0]

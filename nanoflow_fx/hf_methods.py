"""The Hugging Face contract on an optimized model: `generate`, `generate_batch`, `init_continuous_batching` and
`set_attn_implementation` run on nanoflow's engine, each bound to the model through a weak reference.

`install` puts them (and the runtime, `model.nanoflow`) on the model; `uninstall` takes them off. Before requests
run, the model is checked against what changed since `optimize()` (`model_follower`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from nanoflow_fx.capture import hf_attention
from nanoflow_fx.capture.fuse_linears import FusedLayout
from nanoflow_fx.errors import NanoFlowError
from nanoflow_fx.runtime.continuous import ContinuousBatchingManager, generate_batch, to_output
from nanoflow_fx.runtime.generate import plan_generation, run_generation

__all__ = ["INSTALLED", "ModelMethod", "install", "model_follower", "plain_choice", "runtime_of", "uninstall"]

log = logging.getLogger(__name__)

INSTALLED = ("generate", "generate_batch", "init_continuous_batching", "set_attn_implementation")


class ModelMethod:
    """`model.generate` and the others `optimize()` sets on the model: `function` bound to the model through a weak
    reference. A bound method kept in the model's own `__dict__` would put the model in a reference cycle, and
    dropping the model would free it (its KV cache, its weights) only when the garbage collector next ran."""

    def __init__(self, function: Callable[..., Any], model: PreTrainedModel) -> None:
        functools.update_wrapper(self, function)
        self.__func__, self._model = function, weakref.ref(model)
        self.__signature__ = inspect.signature(types.MethodType(function, model))  # without `self`

    @property
    def __self__(self) -> PreTrainedModel | None:
        return self._model()

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelMethod:
        """Bound to the copy of the model (as a deep-copied bound method is)."""
        # (None, for a deleted model, fails as before: weakref.ref(None) raises TypeError)
        return ModelMethod(self.__func__, copy.deepcopy(self._model(), memo))  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise ReferenceError(f"the model of {self.__func__.__name__} was deleted")
        return self.__func__(model, *args, **kwargs)


def runtime_of(model: PreTrainedModel) -> Any:
    """The model's runtime, checked against what changed since `optimize()`."""
    runtime = model.__dict__.get("nanoflow")
    if runtime is None:
        raise NanoFlowError(f"this {type(model).__name__} is a copy of a model optimized by nanoflow_fx; its KV cache "
                            "and captured step stayed with the original: call nanoflow_fx.optimize() on the copy")
    if model.config._attn_implementation != hf_attention.ATTN_IMPLEMENTATION:  # set behind our back (the config)
        _set_attn_implementation(model, model.config._attn_implementation)
    runtime.follow_model(relayout=False)  # (a moved model fails here, before any request; the engine lays out)
    return runtime


def model_follower(model: PreTrainedModel, dtype: torch.dtype, device: torch.device,
                    layout: FusedLayout) -> Callable[..., None]:
    """What is checked before requests run on the model (each generate() call, each step that takes new requests
    of the engine, so also the manager's): the model must still have the dtype and device it was optimized for
    (else: call optimize() again), and parameters replaced since (`load_state_dict(..., assign=True)`,
    `p.data = new`) are laid out again as the captured step reads them (not with `relayout=False`: the entry
    points check the placement only, the engine's step does both). Holds the model weakly (no cycle)."""
    model_ref = weakref.ref(model)

    def follow(relayout: bool = True) -> None:
        model = model_ref()
        if model is None:
            raise ReferenceError("the optimized model was deleted")
        param = next(model.parameters())
        if param.dtype != dtype or param.device != device:
            raise NanoFlowError(
                f"the model moved from {dtype} on {device} to {param.dtype} on {param.device} after "
                "nanoflow_fx.optimize(); its KV cache and captured step are for the old ones: call "
                "nanoflow_fx.optimize(model) again")
        if relayout:
            layout.restore()

    return follow


def plain_choice(model: PreTrainedModel, requested: str | None) -> str:
    """The plain forward's attention for a requested implementation (`hf_attention.PlainAttention`)."""
    plain = requested if requested in hf_attention.PLAIN_ATTENTION else "eager"
    if plain == "sdpa" and not getattr(model, "_supports_sdpa", False):
        plain = "eager"
    if plain != requested and requested != hf_attention.ATTN_IMPLEMENTATION:
        log.info("nanoflow_fx: %s's plain forward runs on eager attention beside nanoflow's step (%r is not one of "
                 "%s)", type(model).__name__, requested, hf_attention.PLAIN_ATTENTION)
    return plain


def _set_attn_implementation(self: PreTrainedModel, attn_implementation: str) -> None:
    """transformers' `set_attn_implementation` after `optimize()`: it sets the plain forward's attention ("eager"
    or "sdpa"; others run it on eager attention); generate(), generate_batch and the manager keep nanoflow's
    step. The config keeps naming "nanoflow": nothing is flipped per call."""
    if not isinstance(attn_implementation, str):
        raise NanoFlowError("after nanoflow_fx.optimize(), set_attn_implementation takes one implementation name "
                            f"for the whole model, got {attn_implementation!r}")
    if attn_implementation == hf_attention.ATTN_IMPLEMENTATION:
        return
    hf_attention.PLAIN.set(self.config, plain_choice(self, attn_implementation))
    if self.config._attn_implementation != hf_attention.ATTN_IMPLEMENTATION:
        type(self).set_attn_implementation(self, hf_attention.ATTN_IMPLEMENTATION)
    runtime = self.__dict__.get("nanoflow")
    if runtime is not None:
        runtime.original_attention = attn_implementation  # what a later optimize() or teardown restores


def _generate(
    self: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """HF's `generate()` contract on nanoflow's fast path; other options run HF's own generate()."""
    runtime = runtime_of(self)
    plane = runtime.plane
    if plane is None:
        plan = plan_generation(self, inputs, generation_config, kwargs)
    else:  # tensor parallelism: rank 0's call is what runs, on every rank (`runtime.control_plane`)
        plan = plane.share(lambda: plan_generation(self, inputs, generation_config, kwargs))
    if isinstance(plan, str):  # (under TP every rank runs it on its own arguments: they must be rank 0's)
        log.info("nanoflow_fx: running transformers' generate() because %s", plan)
        # (PreTrainedModel declares no generate: the model's class mixes in GenerationMixin)
        return type(self).generate(self, inputs, generation_config, **kwargs)  # type: ignore[attr-defined]
    return run_generation(runtime.engine, plan)


def _generate_batch(self: PreTrainedModel, inputs: list[list[int]], generation_config: GenerationConfig | None = None,
                    continuous_batching_config: Any = None, record_timestamps: bool = False,
                    progress_bar: bool = False, persistent_manager: bool = False, warmup: bool = True,
                    **kwargs: Any) -> dict[str, Any]:
    """transformers' `generate_batch` on nanoflow's engine (`continuous_batching_config`, `persistent_manager`
    and `warmup` are accepted and have nothing to set: the engine is configured by `NanoFlowConfig`). Under
    data parallelism (`runtime.replicas`) the replicas share the prompts out and every rank returns every result."""
    runtime = runtime_of(self)
    engine, plane = runtime.engine, runtime.plane

    def run(prompts: list[list[int]], request_ids: list[str] | None = None) -> dict[str, Any]:
        return generate_batch(self, engine, prompts, generation_config, progress_bar, record_timestamps,
                              request_ids, **kwargs)

    def follow() -> dict[str, Any]:  # (tensor parallelism: TP rank 0's requests run, on every rank)
        assert plane is not None
        return {r.request_id: to_output(r) for r in plane.follow(engine)}

    if runtime.replicas is not None:  # (data parallelism: each replica runs its share; every rank gets all)
        return runtime.replicas.generate_batch(inputs, run, follow)
    if plane is not None and not plane.is_driver:
        return follow()
    return run(inputs)


def _init_continuous_batching(self: PreTrainedModel, generation_config: GenerationConfig | None = None,
                              continuous_batching_config: Any = None, workload_hints: Any = None
                              ) -> ContinuousBatchingManager:
    """transformers' `init_continuous_batching`: a manager whose background thread steps nanoflow's engine."""
    return ContinuousBatchingManager(self, runtime_of(self).engine, generation_config)


def install(model: PreTrainedModel, runtime: Any) -> None:
    """Attach `runtime` to `model` as `model.nanoflow` and put the methods above in place of HF's."""
    # (instance attributes over methods: mypy sees nn.Module's __getattr__ type, or the method, for these names)
    model.nanoflow = runtime
    model.generate = ModelMethod(_generate, model)  # type: ignore[assignment]
    model.generate_batch = ModelMethod(_generate_batch, model)  # type: ignore[assignment]
    model.init_continuous_batching = ModelMethod(_init_continuous_batching, model)  # type: ignore[assignment]
    model.set_attn_implementation = ModelMethod(_set_attn_implementation, model)  # type: ignore[method-assign]


def uninstall(model: PreTrainedModel) -> Any:
    """Take `model.nanoflow` and the methods `install` set off the model; returns the runtime (or None)."""
    runtime = model.__dict__.get("nanoflow")
    for name in (*INSTALLED, "nanoflow"):
        model.__dict__.pop(name, None)
    return runtime

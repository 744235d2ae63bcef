"""`optimize()`: accelerate a Hugging Face causal LM in place, in phases: capture the step (while the attention
backend readies its kernels), check it against the eager model, size the KV cache, capture CUDA graphs, search
nano-batch schedules ("auto"); then put the HF contract methods on the model.

What each phase uses lives beside what it is about: config resolution in `config`, the runtime object in
`model_runtime`, the lowering in `capture.lowering`, the check in `capture.check`, KV sizing in `runtime.kv_cache`,
the HF methods in `hf_methods`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture import hf_attention
from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.check import PROBE_LENGTHS, check_against_eager, probe_prompts
from nanoflow_fx.capture.fp8_weights import Fp8Weights, quantize_linears
from nanoflow_fx.capture.fuse_linears import FusedLayout, relayout_parallel_linears
from nanoflow_fx.capture.kv_scales import calibrate
from nanoflow_fx.capture.lowering import lowering_for
from nanoflow_fx.capture.support import check_supported
from nanoflow_fx.capture.tensor_parallel import localize, vocab_size
from nanoflow_fx.config import NanoFlowConfig, as_config, cache_root
from nanoflow_fx.cost.autotune import search_schedules
from nanoflow_fx.errors import CaptureMismatchError, UnsupportedModelError
from nanoflow_fx.hf_methods import install, plain_choice, uninstall
from nanoflow_fx.model_runtime import NanoFlowRuntime, start_interim
from nanoflow_fx.runtime.kv_cache import default_pages, pages_from_memory, profile_pages

__all__ = ["optimize", "backend", "NanoFlowRuntime"]

log = logging.getLogger(__name__)


def backend(config: NanoFlowConfig | dict[str, Any] | None = None) -> Callable[..., Any]:
    """The nanoflow `torch.compile` backend: `torch.compile(fn, backend=nanoflow_fx.backend(config))`.

    Captures `fn` to one ATen graph (the attention op's KV-cache writes kept in place) and lowers it through the
    passes `config` asks for (`capture.lowering`) to a program of pieces between attention calls, run whole.
    `config.inductor` "auto" means off here (no device is known). With `linear_dtype="fp8_e4m3"` the FP8 linears
    `fn` calls (`nanoflow::fp8_linear`, as `optimize()`'s `Fp8Linear` modules do) become FP8 GEMMs; plain linears
    are not quantised here."""
    return make_backend(lowering_for(as_config(config)))


def optimize(model: PreTrainedModel, config: NanoFlowConfig | dict[str, Any] | None = None) -> PreTrainedModel:
    """Accelerate `model` in place and return it (the same object; `isinstance` checks still hold).

    After this, `model.generate(...)`, `model.generate_batch(...)` and `model.init_continuous_batching(...)`
    run on nanoflow's engine, and `model(...)` keeps working as before. `config` is a `NanoFlowConfig` or a dict
    of its fields. Raises `UnsupportedModelError` for models outside the supported class and
    `CaptureMismatchError` if the captured step disagrees with the eager model on a probe input; on any error
    the model is left as it was. Calling it again (e.g. after moving the model) replaces the runtime: the old one
    is freed first (its KV cache holds most of the GPU's memory), so if that call fails, the model is left
    without a runtime: its own `generate()` and attention, as if never optimized.
    """
    config = as_config(config)
    tensor_parallel = localize(model)  # tensor parallelism: DTensor shards -> plain local shards + collectives
    if tensor_parallel is not None and config.linear_dtype != "auto":
        raise UnsupportedModelError(
            f"NanoFlowConfig.linear_dtype={config.linear_dtype!r} with tensor parallelism (rank {tensor_parallel.rank} "
            f"of {tensor_parallel.world_size}) is not supported yet: the FP8 linears would replace the sharded "
            "linears' collectives; use linear_dtype='auto' under TP (an FP8 KV cache works)")
    check_supported(model)
    _use_cache_dir(config)
    _teardown(model)
    original_attention = model.config._attn_implementation
    layouts: list[FusedLayout] = []
    fp8: list[Fp8Weights] = []

    def relayout() -> FusedLayout:
        layouts.append(FusedLayout(()) if not config.fuse_linears or model.device.type == "meta" else  # meta: no
                       relayout_parallel_linears(model, _relayout_probe(model)))  # weights to lay out, no probe
        return layouts[-1]

    try:
        begin = time.perf_counter()
        model.eval()
        hf_attention.register()
        hf_attention.PLAIN.set(model.config, plain_choice(model, original_attention))
        model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
        _use_static_experts(model)
        # FP8 linears (`linear_dtype`; another library's FP8 linears are converted in any case) before any forward
        # (another library's may not run here) and before the fused groups are laid out (with their scales)
        fp8.append(quantize_linears(model, quantize=config.linear_dtype == "fp8_e4m3"))
        runtime = NanoFlowRuntime(model, config, original_attention, relayout)
        _build(model, runtime, begin, fp8[0])
    except BaseException:
        for layout in layouts:
            layout.undo()
        for weights in fp8:
            weights.undo()
        model.set_attn_implementation(original_attention)
        raise
    fp8[0].commit()  # (the full-precision weights the quantised linears replaced are freed)
    install(model, runtime)
    return model


def _build(model: PreTrainedModel, runtime: NanoFlowRuntime, begin: float, fp8: Fp8Weights) -> None:
    """Capture and check the step, size the KV cache, capture CUDA graphs; records `runtime.timings`. A progress
    bar over these phases appears when they take more than a few seconds. `fp8`: the linears quantised to FP8,
    whose full-precision weights leave the GPU before the KV cache is sized from its free memory."""
    from tqdm.auto import tqdm

    cfg = runtime.config
    sized_by_memory = cfg.num_pages is None and runtime.device.type == "cuda"
    pages = profile_pages(cfg, sum(PROBE_LENGTHS)) if sized_by_memory else default_pages(cfg)
    if cfg.calibrate_kv_scales and runtime.device.type != "meta":  # (before any step writes the cache)
        runtime.kv_scales = calibrate(model, probe_prompts(model, cfg.max_batch_size), len(runtime.layers))
    runtime.use_cache(runtime.new_cache(pages))
    start = time.perf_counter()
    # (under tensor parallelism every rank searches together, on the times of the slowest rank: `cost.autotune`)
    search = cfg.num_nanobatches == "auto" and runtime.device.type == "cuda"
    with tqdm(total=4 + search, desc="nanoflow_fx.optimize", unit="phase", delay=3.0, leave=False,
              disable=None) as bar:
        # The step is traced (or loaded) for the probe's inputs without running it while the attention backend
        # readies its kernels (started by NanoFlowRuntime); the probe then runs what both made, or, if the kernels
        # are not ready yet, the first steps run on a stand-in (`_start_interim`).
        bar.set_postfix_str("capture the step")
        preparation = runtime.attention_ready
        runtime.runner.run_prompts(probe_prompts(model, cfg.max_batch_size), all_logits=True, trace_only=True)
        traced = time.perf_counter()
        interim = start_interim(model, runtime, begin)
        if preparation is not None and not interim:
            preparation.wait()
        prepared = time.perf_counter()
        bar.update()
        bar.set_postfix_str("check the step")
        if cfg.check_capture:
            try:
                runtime.probe = check_against_eager(model, runtime.runner, cfg.max_batch_size, fp8)
            except CaptureMismatchError as e:
                step_fn = runtime.step_fn
                if step_fn.direct is None:
                    raise
                log.warning("nanoflow_fx: the step %s failed the check (%s); tracing every layer again",
                            f"loaded from {step_fn.store.path if step_fn.store else '?'}" if step_fn.loaded
                            else "replicated from its first layers", e)
                step_fn.discard_loaded()
                runtime.probe = check_against_eager(model, runtime.runner, cfg.max_batch_size, fp8)
        probed = time.perf_counter()
        bar.update()
        bar.set_postfix_str("size the KV cache")
        fp8.park()
        if sized_by_memory:
            pages = pages_from_memory(runtime.runner, cfg, vocab_size(model))
            if runtime.plane is not None:  # (every rank's scheduler must see the same cache)
                pages = runtime.plane.agree_min(pages)
            runtime.replace_cache(pages)
        sized = time.perf_counter()
        bar.update()
        bar.set_postfix_str("capture CUDA graphs")
        runtime.cache_sized = True
        if cfg.cuda_graphs and runtime.runner.interim is None:
            runtime.runner.enable_cuda_graphs()
            runtime.agree_cuda_graphs()
        elif cfg.cuda_graphs:  # captured at the switch (`_start_interim`)
            runtime.runner.cuda_graphs_off_reason = (f"captured once {runtime.attention_backend.name}'s kernels are "
                                                     "built (until then steps run on the interim kernel)")
        bar.update()
        searched = time.perf_counter()
        if search and runtime.runner.interim is not None:  # searched at the switch, on the backend's own kernels
            runtime.search_pending, search = True, False
        if search:
            bar.set_postfix_str("search nano-batch schedules")
            search_schedules(model, runtime, os.path.join(cache_root(cfg), "cost"))
            bar.update()
    runtime.capture_seconds = time.perf_counter() - start
    # compile_s: Dynamo + AOT (+ Inductor) of the step, or loading it (`capture.store`); attention_wait_s: waiting,
    # after that, for the attention backend's kernels (FlashInfer's build)
    compile_s = runtime.step_fn.compile_seconds
    graphs = runtime.runner.cuda_graphs
    probe_s = probed - start - compile_s - (prepared - traced)
    build_s = preparation.seconds if preparation is not None else None  # how long the backend's kernels took
    timings = dict(setup_s=start - begin, compile_s=compile_s, attention_wait_s=prepared - traced,
                   attention_start_s=runtime.attention_started - begin,
                   **({"attention_build_s": build_s} if build_s is not None else {}),
                   attention_interim=float(interim),
                   probe_s=probe_s, kv_sizing_s=sized - probed,
                   cuda_graphs_s=graphs.capture_seconds if graphs else 0.0,
                   schedule_search_s=time.perf_counter() - searched if search else 0.0,
                   **{f"compile_{k}": v for k, v in runtime.step_fn.compile_breakdown.items()})
    runtime.timings = {**timings, **runtime.timings}  # (a switch from the interim kernel during optimize(): its own)
    log.info("nanoflow_fx: optimized %s (%d attention layers, %s attention, KV cache %d pages of %s = %.1f MiB, "
             "step budget %d tokens, capture %.1f s: %s)", type(model).__name__, len(runtime.layers),
             runtime.attention_backend.name, runtime.kv_cache.allocator.num_pages,
             str(runtime.kv_cache.dtype).removeprefix("torch."), runtime.kv_cache.num_bytes / 2**20,
             cfg.max_num_tokens, runtime.capture_seconds, ", ".join(f"{k} {v:.1f}" for k, v in runtime.timings.items()))


def _use_cache_dir(config: NanoFlowConfig) -> None:
    """Point Inductor's on-disk cache into `config.cache_dir` (see `NanoFlowConfig.cache_dir`)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root(config), "inductor"))


def _teardown(model: PreTrainedModel) -> None:
    """Undo a previous `optimize()` of this model, so it can be optimized again (e.g. after a move). The old
    runtime's KV cache and CUDA graphs are freed here, before the new runtime sizes its cache from the free
    memory: the runtime sits in reference cycles (its runner, engine and step function refer to each other), so
    dropping the model's reference alone left it, and ~all of the GPU's memory, to whenever Python's cycle
    collector next ran."""
    runtime = uninstall(model)
    if isinstance(runtime, NanoFlowRuntime):
        model.set_attn_implementation(runtime.original_attention)
        del runtime
        gc.collect()


def _relayout_probe(model: PreTrainedModel) -> dict[str, Any]:
    """One eager forward that reaches every linear: two tokens, no cache."""
    return dict(input_ids=torch.tensor([[1, 2]], device=model.device), use_cache=False)


def _use_static_experts(model: PreTrainedModel) -> None:
    """MoE layers: HF's default experts loop is data-dependent (no full-graph capture); `batched_mm` is
    static-shaped and token-parallel, so it captures into one graph and splits along tokens."""
    can_set = getattr(model, "_can_set_experts_implementation", lambda: False)()
    if can_set and getattr(model.config, "_experts_implementation", None) in (None, "eager"):
        model.set_experts_implementation("batched_mm")

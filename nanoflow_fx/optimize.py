"""`optimize()`: accelerate a Hugging Face causal LM in place."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from nanoflow_fx.capture import hf_attention
from nanoflow_fx.capture.backend import GraphSink, make_backend
from nanoflow_fx.capture.fuse_linears import relayout_parallel_linears
from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.capture.support import check_supported, discover_layers
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.errors import CaptureMismatchError, NanoFlowError
from nanoflow_fx.ops import flashinfer_attention
from nanoflow_fx.ops.flashinfer_attention import AttentionConfig
from nanoflow_fx.runtime.batch import Chunk
from nanoflow_fx.runtime.engine import StepEngine
from nanoflow_fx.runtime.generate import plan_generation, run_generation
from nanoflow_fx.runtime.green_context import partition_streams
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.nanobatch import NanobatchRunner, StepContext

__all__ = ["optimize", "backend", "NanoFlowRuntime"]

log = logging.getLogger(__name__)

_PROBE_LENGTHS = (5, 3)  # two requests of different lengths: packing, per-request causality and paging
# How far the captured step's probe logits may be from the eager model's. fp32/fp64: max |diff| relative to
# the largest logit (they differ only by reduction order: ~1e-6 seen in fp32). Half precision: every layer
# rounds (bf16 keeps 8 significant bits), so a max over ~10^6 logits of a large model is a tail statistic
# (an 8B random-weight model reached 5.2% of the largest logit with a correct step); the check is instead each
# token row's RMS difference relative to that row's RMS logit. Rounding gives ~1% there; a real fault (a
# wrong mask, position, window or cache slot) changes a whole row's distribution, far above 2^-4.
_PROBE_MAX_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_PROBE_ROW_RMS_TOLERANCE = 2**-4


class NanoFlowRuntime:
    """What `optimize()` attaches to a model as `model.nanoflow`: config, captured step, KV cache, engine."""

    def __init__(self, model: PreTrainedModel, config: NanoFlowConfig) -> None:
        self.config = config
        self.layers = discover_layers(model)
        dtype = next(model.parameters()).dtype
        self.kv_cache = PagedKVCache(self.layers, config.total_pages, config.page_size, dtype, model.device)
        self.step_context = StepContext(page_size=config.page_size) if config.nanobatched else None
        self.step_fn = StepFunction(model, lambda on_graph: backend(config, on_graph, self.step_context))
        self.attention_configs = tuple(dict.fromkeys(
            AttentionConfig(s.num_qo_heads, s.num_kv_heads, s.head_dim, s.scaling, s.sliding_window, s.softcap)
            for s in self.layers
        ))
        self.attention_backend = resolve_attention_backend(config, model.device, dtype, self.attention_configs)
        self.engine = StepEngine(self.step_fn, self.kv_cache, config, self.attention_backend, self.attention_configs,
                                 self.step_context)
        self.capture_seconds = 0.0  # all of optimize()'s capture work; `timings` breaks it down
        self.timings: dict[str, float] = {}
        self.fused_linear_groups = 0  # groups of linears sharing an input laid out for one GEMM (fuse_linears)


def backend(
    config: NanoFlowConfig | None = None, on_graph: GraphSink | None = None, context: StepContext | None = None,
) -> Callable[..., Any]:
    """The nanoflow `torch.compile` backend: `torch.compile(fn, backend=nanoflow_fx.backend(config))`.

    Captures to one ATen graph (in-place KV-cache writes kept in place). With `num_nanobatches` > 1 the graph
    runs through the passes (annotate, group, split, assign units) and a Schedule executor (one stream, or one
    per execution unit with `sm_partition`); with `inductor` its pieces between attention calls are compiled
    by Inductor; otherwise it runs as captured. `on_graph` receives each captured (unsplit) ATen GraphModule.
    `context` (the engine's) lets nano-batched steps split their attention metadata on the host, not the device.
    """
    config = config or NanoFlowConfig()
    count = config.num_nanobatches
    streams = None
    if config.sm_partition != "off":
        mode, sms = config.sm_partition, config.memory_sms
        streams = lambda device: partition_streams(mode, sms, device)  # noqa: E731
    if config.nanobatched:
        lower = lambda gm: NanobatchRunner(gm, count, streams=streams, context=context)  # noqa: E731
    else:
        lower = None
    return make_backend(lower, on_graph, inductor=config.inductor, fuse_linears=config.fuse_linears)


def optimize(model: PreTrainedModel, config: NanoFlowConfig | None = None) -> PreTrainedModel:
    """Accelerate `model` in place and return it (the same object; `isinstance` checks still hold).

    After this, `model.generate(...)` runs on nanoflow's paged, token-packed captured step, and `model(...)`
    keeps working as before. Raises `UnsupportedModelError` for models outside the supported class and
    `CaptureMismatchError` if the captured step disagrees with the eager model on a probe input.
    """
    begin = time.perf_counter()
    config = config or NanoFlowConfig()
    check_supported(model)
    model.eval()
    fused_groups = 0
    if config.fuse_linears and model.device.type != "meta":  # meta: no weights to lay out, and no eager probe
        fused_groups = relayout_parallel_linears(model, _relayout_probe(model))
    hf_attention.register()
    model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
    _use_static_experts(model)
    runtime = NanoFlowRuntime(model, config)
    runtime.fused_linear_groups = fused_groups
    start = time.perf_counter()
    if config.check_capture:
        _check_against_eager(model, runtime)
    probed = time.perf_counter()
    if config.cuda_graphs:
        runtime.engine.enable_cuda_graphs()
    runtime.capture_seconds = time.perf_counter() - start
    # compile_s: Dynamo + AOT (+ Inductor) of the step, inside the first run (the probe, else graph capture)
    compile_s = runtime.step_fn.compile_seconds
    graphs = runtime.engine.cuda_graphs
    probe_s = probed - start - (compile_s if config.check_capture else 0.0)
    runtime.timings = dict(setup_s=start - begin, compile_s=compile_s, probe_s=probe_s,
                           cuda_graphs_s=graphs.capture_seconds if graphs else 0.0)
    model.nanoflow = runtime  # type: ignore[assignment]
    model.generate = types.MethodType(_generate, model)  # type: ignore[method-assign]
    log.info("nanoflow_fx: optimized %s (%d attention layers, KV cache %.1f MiB, capture %.1f s: %s)",
             type(model).__name__, len(runtime.layers), runtime.kv_cache.num_bytes / 2**20, runtime.capture_seconds,
             ", ".join(f"{k} {v:.1f}" for k, v in runtime.timings.items()))
    return model


def resolve_attention_backend(
    config: NanoFlowConfig, device: torch.device, dtype: torch.dtype, attention_configs: Sequence[AttentionConfig],
) -> str:
    """The kernel `config.attention_backend` means for this model (see `NanoFlowConfig.attention_backend`)."""
    name = config.attention_backend
    flashinfer_blocker = flashinfer_attention.unsupported_reason(attention_configs, dtype, device)
    if config.nanobatched and not flashinfer_blocker:
        flashinfer_blocker = "nano-batched steps attend per nano-batch, and FlashInfer plans whole steps"
    if name == "flashinfer" and flashinfer_blocker:
        raise NanoFlowError(f"attention_backend='flashinfer' cannot run here: {flashinfer_blocker}; "
                            "use 'triton' (GPU), 'torch' or 'auto'")
    triton_ok = importlib.util.find_spec("triton") is not None
    if name == "auto":
        if not flashinfer_blocker:
            return "flashinfer"
        return "triton" if device.type == "cuda" and triton_ok else "torch"
    if name == "triton":
        if not triton_ok:
            raise NanoFlowError("attention_backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise NanoFlowError(f"attention_backend='triton' runs on CUDA (the model is on {device}); "
                                "use 'torch', or set TRITON_INTERPRET=1 to interpret the kernel on the CPU")
    return name


def _relayout_probe(model: PreTrainedModel) -> dict[str, Any]:
    """One eager forward that reaches every linear: two tokens, no cache."""
    return dict(input_ids=torch.tensor([[1, 2]], device=model.device), use_cache=False)


def _use_static_experts(model: PreTrainedModel) -> None:
    """MoE layers: HF's default experts loop is data-dependent (no full-graph capture); `batched_mm` is
    static-shaped and token-parallel, so it captures into one graph and splits along tokens."""
    can_set = getattr(model, "_can_set_experts_implementation", lambda: False)()
    if can_set and getattr(model.config, "_experts_implementation", None) in (None, "eager"):
        model.set_experts_implementation("batched_mm")


def _generate(
    self: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """HF's `generate()` contract on nanoflow's fast path; other options run HF's own generate()."""
    plan = plan_generation(self, inputs, generation_config, kwargs)
    if isinstance(plan, str):
        log.info("nanoflow_fx: running transformers' generate() because %s", plan)
        return type(self).generate(self, inputs, generation_config, **kwargs)  # type: ignore[no-any-return]
    return run_generation(self.nanoflow.engine, plan)  # type: ignore[union-attr]


@torch.no_grad()
def _check_against_eager(model: PreTrainedModel, runtime: NanoFlowRuntime) -> None:
    """Run the captured step on a probe (two packed prompts) and compare every logit with the eager model."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = _PROBE_LENGTHS[: runtime.config.max_batch_size]  # one prompt only if the batch holds one
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    engine = runtime.engine
    requests = engine.admit(prompts, max_new_tokens=1)
    try:
        got = engine.run([Chunk(r, len(r.prompt)) for r in requests], all_logits=True).float()
    finally:
        engine.release(requests)
    want = torch.cat([model(torch.tensor([p], device=model.device), use_cache=False).logits[0] for p in prompts])
    want = want.float()
    dtype = next(model.parameters()).dtype
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    if dtype in _PROBE_MAX_TOLERANCE:
        ok = diff <= _PROBE_MAX_TOLERANCE[dtype] * scale
        measure = f"max |logit diff| {diff:.3g} (logit scale {scale:.3g})"
    else:
        row_rms = ((got - want).pow(2).mean(-1).sqrt() / want.pow(2).mean(-1).sqrt().clamp(min=1e-6)).max().item()
        ok = row_rms <= _PROBE_ROW_RMS_TOLERANCE
        measure = (f"relative RMS logit diff of a token row {row_rms:.3g} > {_PROBE_ROW_RMS_TOLERANCE:.3g} "
                   f"(max |logit diff| {diff:.3g}, logit scale {scale:.3g})")
    if not ok:
        raise CaptureMismatchError(
            f"{type(model).__name__} ({model.config.model_type}): the captured nanoflow step differs from the eager "
            f"model on the probe by {measure}, dtype {dtype}; "
            "this model uses something nanoflow_fx does not reproduce; please report it with the model name"
        )

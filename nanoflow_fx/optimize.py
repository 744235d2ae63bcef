"""`optimize()`: accelerate a Hugging Face causal LM in place."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import inspect
import logging
import os
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from nanoflow_fx.capture import hf_attention
from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.fuse_linears import FusedLayout, relayout_parallel_linears
from nanoflow_fx.capture.lowering import lowering_for
from nanoflow_fx.capture.replicate import find_layer_stack
from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.capture.store import StepStore, step_key
from nanoflow_fx.capture.support import check_supported, discover_layers
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.cost.autotune import search_schedules
from nanoflow_fx.cost.device import measure_ceilings, token_budget
from nanoflow_fx.cost.model import CostTable, DecodeTiming
from nanoflow_fx.errors import CaptureMismatchError, KVCacheExhaustedError, NanoFlowError
from nanoflow_fx.ops import backend as attention_backends
from nanoflow_fx.runtime.continuous import ContinuousBatchingManager, generate_batch
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.generate import plan_generation, run_generation
from nanoflow_fx.runtime.kv_cache import PagedKVCache, page_bytes
from nanoflow_fx.runtime.program_runner import Cut, make_units
from nanoflow_fx.runtime.step_runner import StepRunner
from nanoflow_fx.schedule import Split

__all__ = ["optimize", "backend", "NanoFlowRuntime"]

log = logging.getLogger(__name__)

_PROBE_LENGTHS = (5, 3)  # two requests of different lengths: packing, per-request causality and paging
# How far the captured step's probe logits may be from the eager model's. fp32/fp64: max |diff| relative to
# the largest logit (they differ only by reduction order: ~1e-6 seen in fp32). Half precision: every layer
# rounds (bf16 keeps 8 significant bits), so a max over ~10^6 logits of a large model is a tail statistic
# (an 8B random-weight model reached 5.2% of the largest logit with a correct step); the check is instead each
# token row's RMS difference relative to that row's RMS logit. Rounding gives ~1% there; a real fault (a
# wrong mask, position, window or cache slot) changes a whole row's distribution, far above 2^-4.
# fp64 models get fp32's bound: HF's eager attention takes its softmax in fp32 whatever the model's dtype.
_PROBE_MAX_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_PROBE_ROW_RMS_TOLERANCE = 2**-4
_CPU_MAX_NUM_TOKENS = 512
_CPU_SEQ_CAP = 4096  # CPU default cache: max_batch_size sequences of at most this many tokens


class NanoFlowRuntime:
    """What `optimize()` attaches to a model as `model.nanoflow`: the resolved config, the captured step, the
    KV cache, the step runner and the engine."""

    def __init__(self, model: PreTrainedModel, config: NanoFlowConfig, original_attention: str,
                 relayout: Callable[[], FusedLayout]) -> None:
        """`relayout()` lays out the fused linears' weights (`fuse_linears`); it runs once the attention backend
        has started readying its kernels."""
        self.original_attention = original_attention  # restored if optimize() fails or runs again
        self.dtype, self.device = next(model.parameters()).dtype, model.device
        self.layers = discover_layers(model)  # layer i's attention configuration
        self.attention_configs = tuple(dict.fromkeys(self.layers))
        self.attention_backend = attention_backends.choose(config.attention_backend, self.attention_configs,
                                                           self.dtype, self.device)
        # The attention backend readies its kernels from here on (FlashInfer: a JIT build of ~26 s on a fresh
        # machine, the longest part of a fresh optimize()), while the weights are laid out and the step traced;
        # `_build` waits for them. So it starts first, as soon as the layers' shapes are known.
        self.attention_ready = self.attention_backend.prepare(self.attention_configs, config.page_size,
                                                              self.dtype, self.device)
        self.attention_started = time.perf_counter()
        self.probe: tuple[list[list[int]], torch.Tensor] | None = None  # the check's prompts, eager logits
        self.cache_sized = False  # the KV cache is the one it keeps (CUDA graphs are captured on it)
        self.config = _resolve(config, model, self.device, self.dtype)
        self.layout = relayout()
        self.follow_model = _model_follower(model, self.dtype, self.device, self.layout)
        self.lowering = lowering_for(self.config)  # the passes every step is lowered through
        self.split_policy = even_split(self.config, self.device) if self.config.nanobatched else None
        self.search_pending = False  # num_nanobatches="auto": the search waits for the backend's kernels
        self.tunings: list[Any] = []  # num_nanobatches="auto": what the schedule search measured (cost.search)
        self.decode_timings: list[DecodeTiming] = []  # and the memory unit's decode kernels per SM share
        self.cost_table: CostTable | None = None  # and the times it predicted the candidates from (cost.tables)
        lowering = self.lowering  # (not `self`: the step would hold its runtime in a cycle)
        self.step_fn = StepFunction(
            model, lambda on_capture, on_lowered, skip_run, expand=None: make_backend(
                lowering, on_capture, on_lowered, skip_run, expand),
            _step_store(model, self.config, self.lowering.key, self.attention_backend.name),
            find_layer_stack(model, self.layers) if self.config.replicate_layers and self.device.type != "meta"
            else None)
        self.capture_seconds = 0.0  # all of optimize()'s capture work; `timings` breaks it down
        self.timings: dict[str, float] = {}
        self.kv_cache: PagedKVCache
        self.runner: StepRunner
        self.engine: Engine

    def use_cache(self, kv_cache: PagedKVCache) -> None:
        """Run on `kv_cache` from now on (a new step runner and engine; the captured step is kept)."""
        self.kv_cache = kv_cache
        previous = getattr(self, "runner", None)
        self.runner = StepRunner(self.step_fn, kv_cache, self.config, self.attention_backend,
                                 self.attention_configs, self.split_policy)
        if previous is not None:  # steps on a stand-in kernel until the backend's are built (`_start_interim`)
            self.runner.carry_interim(previous)
        self.engine = Engine(self.runner, self.config, before_new_requests=self.follow_model)

    def wait_until_ready(self) -> bool:
        """Wait until steps run on the chosen attention backend: its kernels built (FlashInfer's JIT build, on a
        fresh machine) and, if the first steps ran on the interim kernel (`NanoFlowConfig.interim_attention`),
        the switch made now (its check, the CUDA graphs) rather than at the next step. Returns whether they do
        (False: the build or its check failed and the interim kernel stays, as logged). Benchmarks call it before
        timing steps."""
        if self.attention_ready is not None:
            self.attention_ready.wait()
        with self.engine.lock:  # (a continuous-batching thread may be stepping)
            return self.runner.end_interim()

    @property
    def fused_linear_groups(self) -> int:
        return len(self.layout.groups)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A deep copy of an optimized model gets no runtime (its KV cache, captured step and CUDA graphs belong
        to the original); its generate() says to call optimize() on it."""
        return None


def backend(config: NanoFlowConfig | dict[str, Any] | None = None) -> Callable[..., Any]:
    """The nanoflow `torch.compile` backend: `torch.compile(fn, backend=nanoflow_fx.backend(config))`.

    Captures `fn` to one ATen graph (the attention op's KV-cache writes kept in place) and lowers it through the
    passes `config` asks for (`capture.lowering`) to a program of pieces between attention calls, run whole.
    `config.inductor` "auto" means off here (no device is known)."""
    return make_backend(lowering_for(_as_config(config)))


def even_split(config: NanoFlowConfig, device: torch.device) -> Callable[[int, int], Cut]:
    """The split policy of a fixed nano-batch count: every eager step cut into `num_nanobatches` nano-batches of
    equal size (fewer when it has fewer tokens), on the units `sm_partition` names."""
    n = int(config.num_nanobatches)
    units = make_units(config.sm_partition, config.memory_sms) if device.type == "cuda" else None
    return lambda tokens, decodes: Cut(Split.even(tokens, min(n, tokens)).boundaries, units)


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
    config = _as_config(config)
    check_supported(model)
    _use_cache_dir(config)
    _teardown(model)
    original_attention = model.config._attn_implementation
    layouts: list[FusedLayout] = []

    def relayout() -> FusedLayout:
        layouts.append(FusedLayout(()) if not config.fuse_linears or model.device.type == "meta" else  # meta: no
                       relayout_parallel_linears(model, _relayout_probe(model)))  # weights to lay out, no probe
        return layouts[-1]

    try:
        begin = time.perf_counter()
        model.eval()
        hf_attention.register()
        hf_attention.PLAIN.set(model.config, _plain_choice(model, original_attention))
        model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
        _use_static_experts(model)
        runtime = NanoFlowRuntime(model, config, original_attention, relayout)
        _build(model, runtime, begin)
    except BaseException:
        for layout in layouts:
            layout.undo()
        model.set_attn_implementation(original_attention)
        raise
    model.nanoflow = runtime  # type: ignore[assignment]
    model.generate = _ModelMethod(_generate, model)  # type: ignore[method-assign]
    model.generate_batch = _ModelMethod(_generate_batch, model)  # type: ignore[method-assign]
    model.init_continuous_batching = _ModelMethod(_init_continuous_batching, model)  # type: ignore[method-assign]
    model.set_attn_implementation = _ModelMethod(_set_attn_implementation, model)  # type: ignore[method-assign]
    return model


class _ModelMethod:
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

    def __deepcopy__(self, memo: dict[int, Any]) -> _ModelMethod:
        """Bound to the copy of the model (as a deep-copied bound method is)."""
        return _ModelMethod(self.__func__, copy.deepcopy(self._model(), memo))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise ReferenceError(f"the model of {self.__func__.__name__} was deleted")
        return self.__func__(model, *args, **kwargs)


def _build(model: PreTrainedModel, runtime: NanoFlowRuntime, begin: float) -> None:
    """Capture and check the step, size the KV cache, capture CUDA graphs; records `runtime.timings`. A progress
    bar over these phases appears when they take more than a few seconds."""
    from tqdm.auto import tqdm

    cfg = runtime.config
    sized_by_memory = cfg.num_pages is None and runtime.device.type == "cuda"
    pages = _profile_pages(cfg) if sized_by_memory else _default_pages(cfg)
    runtime.use_cache(PagedKVCache(runtime.layers, pages, cfg.page_size, runtime.dtype, runtime.device))
    start = time.perf_counter()
    search = cfg.num_nanobatches == "auto" and runtime.device.type == "cuda"
    with tqdm(total=4 + search, desc="nanoflow_fx.optimize", unit="phase", delay=3.0, leave=False,
              disable=None) as bar:
        # The step is traced (or loaded) for the probe's inputs without running it while the attention backend
        # readies its kernels (started by NanoFlowRuntime); the probe then runs what both made, or, if the kernels
        # are not ready yet, the first steps run on a stand-in (`_start_interim`).
        bar.set_postfix_str("capture the step")
        preparation = runtime.attention_ready
        runtime.runner.run_prompts(_probe_prompts(model, runtime), all_logits=True, trace_only=True)
        traced = time.perf_counter()
        interim = _start_interim(model, runtime, begin)
        if preparation is not None and not interim:
            preparation.wait()
        prepared = time.perf_counter()
        bar.update()
        bar.set_postfix_str("check the step")
        if cfg.check_capture:
            try:
                runtime.probe = _check_against_eager(model, runtime)
            except CaptureMismatchError as e:
                step_fn = runtime.step_fn
                if step_fn.direct is None:
                    raise
                log.warning("nanoflow_fx: the step %s failed the check (%s); tracing every layer again",
                            f"loaded from {step_fn.store.path if step_fn.store else '?'}" if step_fn.loaded
                            else "replicated from its first layers", e)
                step_fn.discard_loaded()
                runtime.probe = _check_against_eager(model, runtime)
        probed = time.perf_counter()
        bar.update()
        bar.set_postfix_str("size the KV cache")
        if sized_by_memory:
            runtime.use_cache(PagedKVCache(runtime.layers, _pages_from_memory(runtime), cfg.page_size,
                                           runtime.dtype, runtime.device))
        sized = time.perf_counter()
        bar.update()
        bar.set_postfix_str("capture CUDA graphs")
        runtime.cache_sized = True
        if cfg.cuda_graphs and runtime.runner.interim is None:
            runtime.runner.enable_cuda_graphs()
        elif cfg.cuda_graphs:  # captured at the switch (`_start_interim`)
            runtime.runner.cuda_graphs_off_reason = (f"captured once {runtime.attention_backend.name}'s kernels are "
                                                     "built (until then steps run on the interim kernel)")
        bar.update()
        searched = time.perf_counter()
        if search and runtime.runner.interim is not None:  # searched at the switch, on the backend's own kernels
            runtime.search_pending, search = True, False
        if search:
            bar.set_postfix_str("search nano-batch schedules")
            search_schedules(model, runtime, os.path.join(_cache_root(cfg), "cost"))
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
    log.info("nanoflow_fx: optimized %s (%d attention layers, %s attention, KV cache %d pages = %.1f MiB, "
             "step budget %d tokens, capture %.1f s: %s)", type(model).__name__, len(runtime.layers),
             runtime.attention_backend.name, runtime.kv_cache.allocator.num_pages, runtime.kv_cache.num_bytes / 2**20,
             cfg.max_num_tokens, runtime.capture_seconds, ", ".join(f"{k} {v:.1f}" for k, v in runtime.timings.items()))


def _cache_root(config: NanoFlowConfig) -> str:
    return config.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "nanoflow_fx")


def _use_cache_dir(config: NanoFlowConfig) -> None:
    """Point Inductor's on-disk cache into `config.cache_dir` (see `NanoFlowConfig.cache_dir`)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_cache_root(config), "inductor"))


def _step_store(model: PreTrainedModel, config: NanoFlowConfig, lowering_key: str,
                backend_name: str) -> StepStore | None:
    """Where this model's captured step is saved (`NanoFlowConfig.save_step`), or None."""
    if not config.save_step or os.environ.get("NANOFLOW_FX_SAVE_STEP") == "0" or model.device.type == "meta":
        return None
    # What the captured graph depends on of the config: the cache's page shape and the lowering (its passes).
    # The step's sizes (tokens, requests, pages) are symbolic, so the budgets (max_num_tokens: measured, "auto")
    # do not count, and neither does the nano-batch count: a cut is chosen per step at run time.
    fields = {"page_size": config.page_size, "lowering": lowering_key}
    return StepStore(os.path.join(_cache_root(config), "steps"), step_key(model, fields, backend_name))


def _as_config(config: NanoFlowConfig | dict[str, Any] | None) -> NanoFlowConfig:
    if config is None:
        return NanoFlowConfig()
    if isinstance(config, dict):
        return NanoFlowConfig.from_dict(config)
    if not isinstance(config, NanoFlowConfig):
        raise TypeError(f"optimize() takes a NanoFlowConfig or a dict of its fields, got {type(config).__name__}")
    return config


def _resolve(config: NanoFlowConfig, model: PreTrainedModel, device: torch.device,
             dtype: torch.dtype) -> NanoFlowConfig:
    """`config` with every "auto"/None that depends on the model and device made concrete (not `num_pages`:
    that is sized after the probe, from the memory left)."""
    if dtype == torch.float64 and config.attention_backend in ("triton", "flashinfer"):
        raise NanoFlowError(f"attention_backend={config.attention_backend!r} does not take float64 models; "
                            "use 'torch' (or 'auto'), or run the model in float32")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if config.max_seq_len is not None and positions is not None and config.max_seq_len > positions:
        raise NanoFlowError(
            f"NanoFlowConfig.max_seq_len={config.max_seq_len} exceeds {type(model).__name__}'s "
            f"max_position_embeddings={positions}: a longer request would read positions the model does not have; "
            f"set max_seq_len <= {positions} (or None), or raise the model's config.max_position_embeddings if "
            "its position encoding extends further (e.g. scaled RoPE)")
    max_seq_len = config.max_seq_len or positions
    on_cuda = device.type == "cuda"
    budget = config.max_num_tokens
    if budget == "auto":
        element = torch.empty((), dtype=dtype).element_size()
        budget = (token_budget(measure_ceilings(device, _cache_root(config)), element) if on_cuda
                  else _CPU_MAX_NUM_TOKENS)
    inductor = config.inductor if config.inductor != "auto" else on_cuda
    return dataclasses.replace(config, max_seq_len=int(max_seq_len or 2048), max_num_tokens=budget,
                               inductor=inductor)


def _default_pages(cfg: NanoFlowConfig) -> int:
    if cfg.num_pages is not None:
        return cfg.num_pages
    return cfg.max_batch_size * -(-min(cfg.max_seq_len, _CPU_SEQ_CAP) // cfg.page_size)  # type: ignore[type-var]


def _profile_requests(cfg: NanoFlowConfig) -> list[int]:
    """Prompt lengths of the step whose memory `_pages_from_memory` measures: `max_num_tokens` tokens over as
    many requests as may run (every one completing, so the logits and sampling buffers are the largest)."""
    budget, count = int(cfg.max_num_tokens), min(cfg.max_batch_size, int(cfg.max_num_tokens))
    return [budget // count + (1 if i < budget % count else 0) for i in range(count)]


def _profile_pages(cfg: NanoFlowConfig) -> int:
    """Pages of the small cache the probe and the memory profile run on (before the real cache is sized)."""
    return sum(-(-n // cfg.page_size) for n in _profile_requests(cfg)) + 2 * len(_PROBE_LENGTHS)


@torch.no_grad()
def _pages_from_memory(runtime: NanoFlowRuntime) -> int:
    """KV pages that fit in `kv_cache_memory_fraction` of the GPU once weights and the largest step's
    activations are counted: the step is run once (a full `max_num_tokens` step) and its peak measured."""
    cfg, device = runtime.config, runtime.device
    # Memory of dropped objects still in reference cycles (a dropped optimized model is not: it frees its runtime
    # at once; other objects of the caller may be) is reclaimed first, so the cache is sized from what is free;
    # and the allocator's cached free blocks go back to the driver: a previous model's cache, freed into blocks of
    # its own sizes, left the new cache's large allocations without room (models optimized one after another).
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    vocab = runtime.step_fn.model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in _profile_requests(cfg)]
    logits = runtime.runner.run_prompts(prompts)
    logits.float().argmax(-1)  # sampling's buffers
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    budget = cfg.kv_cache_memory_fraction * total - others - peak + runtime.kv_cache.num_bytes
    per_page = page_bytes(runtime.layers, cfg.page_size, runtime.dtype)
    pages = int(budget // per_page)
    need = -(-cfg.max_seq_len // cfg.page_size)  # type: ignore[operator]
    if pages < need:
        raise KVCacheExhaustedError(
            f"after the weights ({_gib(peak)} at the peak of a {cfg.max_num_tokens}-token step) only "
            f"{_gib(max(budget, 0))} of kv_cache_memory_fraction={cfg.kv_cache_memory_fraction} x {_gib(total)} "
            f"is left for the KV cache: {max(pages, 0)} pages, fewer than one sequence of max_seq_len="
            f"{cfg.max_seq_len} needs ({need}); raise kv_cache_memory_fraction, lower max_num_tokens or "
            "max_seq_len, or free GPU memory")
    log.info("nanoflow_fx: KV cache sized from GPU memory: %d pages (%s; step peak %s, other %s of %s)", pages,
             _gib(pages * per_page), _gib(peak), _gib(others), _gib(total))
    return pages


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _teardown(model: PreTrainedModel) -> None:
    """Undo a previous `optimize()` of this model, so it can be optimized again (e.g. after a move). The old
    runtime's KV cache and CUDA graphs are freed here, before the new runtime sizes its cache from the free
    memory: the runtime sits in reference cycles (its runner, engine and step function refer to each other), so
    dropping the model's reference alone left it, and ~all of the GPU's memory, to whenever Python's cycle
    collector next ran."""
    runtime = getattr(model, "nanoflow", None)
    for name in ("generate", "generate_batch", "init_continuous_batching", "set_attn_implementation", "nanoflow"):
        model.__dict__.pop(name, None)
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


def _runtime(model: PreTrainedModel) -> NanoFlowRuntime:
    """The model's runtime, checked against what changed since `optimize()`."""
    runtime = model.__dict__.get("nanoflow")
    if runtime is None:
        raise NanoFlowError(f"this {type(model).__name__} is a copy of a model optimized by nanoflow_fx; its KV cache "
                            "and captured step stayed with the original: call nanoflow_fx.optimize() on the copy")
    if model.config._attn_implementation != hf_attention.ATTN_IMPLEMENTATION:  # set behind our back (the config)
        _set_attn_implementation(model, model.config._attn_implementation)
    runtime.follow_model(relayout=False)  # (a moved model fails here, before any request; the engine lays out)
    return runtime


def _model_follower(model: PreTrainedModel, dtype: torch.dtype, device: torch.device,
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


def _plain_choice(model: PreTrainedModel, requested: str | None) -> str:
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
    hf_attention.PLAIN.set(self.config, _plain_choice(self, attn_implementation))
    if self.config._attn_implementation != hf_attention.ATTN_IMPLEMENTATION:
        type(self).set_attn_implementation(self, hf_attention.ATTN_IMPLEMENTATION)
    runtime = self.__dict__.get("nanoflow")
    if isinstance(runtime, NanoFlowRuntime):
        runtime.original_attention = attn_implementation  # what a later optimize() or teardown restores


def _generate(
    self: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """HF's `generate()` contract on nanoflow's fast path; other options run HF's own generate()."""
    runtime = _runtime(self)
    plan = plan_generation(self, inputs, generation_config, kwargs)
    if isinstance(plan, str):
        log.info("nanoflow_fx: running transformers' generate() because %s", plan)
        return type(self).generate(self, inputs, generation_config, **kwargs)  # type: ignore[no-any-return]
    return run_generation(runtime.engine, plan)


def _generate_batch(self: PreTrainedModel, inputs: list[list[int]], generation_config: GenerationConfig | None = None,
                    continuous_batching_config: Any = None, record_timestamps: bool = False,
                    progress_bar: bool = False, persistent_manager: bool = False, warmup: bool = True,
                    **kwargs: Any) -> dict[str, Any]:
    """transformers' `generate_batch` on nanoflow's engine (`continuous_batching_config`, `persistent_manager`
    and `warmup` are accepted and have nothing to set: the engine is configured by `NanoFlowConfig`)."""
    runtime = _runtime(self)
    return generate_batch(self, runtime.engine, inputs, generation_config, progress_bar, record_timestamps,
                          **kwargs)


def _init_continuous_batching(self: PreTrainedModel, generation_config: GenerationConfig | None = None,
                              continuous_batching_config: Any = None, workload_hints: Any = None
                              ) -> ContinuousBatchingManager:
    """transformers' `init_continuous_batching`: a manager whose background thread steps nanoflow's engine."""
    return ContinuousBatchingManager(self, _runtime(self).engine, generation_config)


def _probe_prompts(model: PreTrainedModel, runtime: NanoFlowRuntime) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = _PROBE_LENGTHS[: runtime.config.max_batch_size]  # one prompt only if the batch holds one
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def _check_against_eager(model: PreTrainedModel, runtime: NanoFlowRuntime) -> tuple[list[list[int]], torch.Tensor]:
    """Run the captured step on a probe (two packed prompts) and compare every logit with the eager model;
    returns the probe and the eager logits (a later check of another attention kernel reuses them)."""
    prompts = _probe_prompts(model, runtime)
    want = torch.cat([model(torch.tensor([p], device=model.device), use_cache=False).logits[0] for p in prompts])
    want = want.float()
    _check_probe(model, runtime.runner, prompts, want)
    return prompts, want


@torch.no_grad()
def _check_probe(model: PreTrainedModel, runner: StepRunner, prompts: list[list[int]], want: torch.Tensor) -> None:
    """Raise `CaptureMismatchError` unless the runner's step gives the eager logits `want` on `prompts`."""
    got = runner.run_prompts(prompts, all_logits=True).float()
    dtype = runner.kv_cache.dtype
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
        kernel = runner.interim.name if runner.interim is not None else runner.backend.name
        raise CaptureMismatchError(
            f"{type(model).__name__} ({model.config.model_type}): the captured nanoflow step ({kernel} attention) "
            f"differs from the eager model on the probe by {measure}, dtype {dtype}; "
            "this model uses something nanoflow_fx does not reproduce; please report it with the model name"
        )


def _start_interim(model: PreTrainedModel, runtime: NanoFlowRuntime, begin: float) -> bool:
    """If the attention backend's kernels are still being built, run the steps on its stand-in until they are
    (`NanoFlowConfig.interim_attention`); returns whether it did. At the first step after the build, `switch`
    checks the backend's step against the eager probe logits and captures the CUDA graphs; a failed build or
    check keeps the stand-in for good, with a warning (its steps were checked: correct, slower)."""
    preparation, cfg = runtime.attention_ready, runtime.config
    if preparation is None or preparation.done() or not cfg.interim_attention:
        return False
    stand_in = runtime.attention_backend.interim_backend(runtime.attention_configs, runtime.dtype, runtime.device)
    if stand_in is None:
        return False
    backend = runtime.attention_backend.name
    # The runner keeps `switch`, and the runtime keeps the runner: weak references, or the runtime (and its KV
    # cache) would outlive the dropped model until the garbage collector ran.
    runtime_ref, model_ref = weakref.ref(runtime), weakref.ref(model)

    def switch(runner: StepRunner) -> bool:
        runtime, model = runtime_ref(), model_ref()
        if runtime is None or model is None:
            return False
        started = time.perf_counter()
        preparation.wait()
        keep = None
        if preparation.failure is not None:
            keep = f"its kernels could not be built ({type(preparation.failure).__name__}: {preparation.failure})"
        elif runtime.probe is not None:
            try:
                _check_probe(model, runner, *runtime.probe)
            except CaptureMismatchError as e:
                keep = f"its step failed the check against the eager model: {e}"
        if keep is not None:  # (the runner then keeps the stand-in for good)
            log.warning("nanoflow_fx: %s attention stays off: %s; steps keep running on %s's kernel (checked, "
                        "slower)", backend, keep, stand_in.name)
            return False
        if cfg.cuda_graphs and runtime.cache_sized:  # (else optimize() captures them once the cache is sized)
            runner.enable_cuda_graphs()
        if runtime.search_pending:  # (num_nanobatches="auto": the search times the backend's own kernels)
            runtime.search_pending = False
            search_schedules(model, runtime, os.path.join(_cache_root(cfg), "cost"))
        runtime.probe = None  # (the probe's logits served this check only)
        # when the switch happened (since optimize() began), and what it cost (the check, the CUDA graphs)
        runtime.timings.update(attention_switch_s=time.perf_counter() - begin,
                               attention_switch_cost_s=time.perf_counter() - started,
                               attention_build_s=preparation.seconds or 0.0)
        log.info("nanoflow_fx: %s attention ready %.1f s after optimize() began; its steps from now on",
                 backend, time.perf_counter() - begin)
        return True

    runtime.runner.run_interim(stand_in, preparation.done, switch)
    log.info("nanoflow_fx: %s's kernels are still being built: the first steps run on %s's kernel", backend,
             stand_in.name)
    return True

"""`NanoFlowRuntime`: what `optimize()` attaches to a model as `model.nanoflow` (the resolved config, the lowering,
the captured step, the KV cache, the step runner and the engine), and the interim attention it may start with.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.check import check_probe
from nanoflow_fx.capture.fuse_linears import FusedLayout
from nanoflow_fx.capture.kv_scales import checkpoint_scales
from nanoflow_fx.capture.lowering import lowering_for
from nanoflow_fx.capture.replicate import find_layer_stack
from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.capture.store import StepStore, step_key
from nanoflow_fx.capture.support import discover_layers
from nanoflow_fx.capture.tensor_parallel import tensor_parallel_of
from nanoflow_fx.config import NanoFlowConfig, cache_root, resolve
from nanoflow_fx.cost.autotune import search_schedules
from nanoflow_fx.cost.model import CostTable, DecodeTiming
from nanoflow_fx.errors import CaptureMismatchError, NanoFlowError
from nanoflow_fx.hf_methods import model_follower
from nanoflow_fx.ops import backend as attention_backends
from nanoflow_fx.ops import kv_quant, xqa
from nanoflow_fx.runtime.control_plane import ControlPlane
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.program_runner import Cut, make_units
from nanoflow_fx.runtime.replicas import Replicas
from nanoflow_fx.runtime.step_runner import SplitPolicy, StepRunner
from nanoflow_fx.schedule import Split

__all__ = ["NanoFlowRuntime", "even_split", "start_interim", "step_store"]

log = logging.getLogger(__name__)


class NanoFlowRuntime:
    """What `optimize()` attaches to a model as `model.nanoflow`: the resolved config, the captured step, the
    KV cache, the step runner and the engine."""

    def __init__(self, model: PreTrainedModel, config: NanoFlowConfig, original_attention: str,
                 relayout: Callable[[], FusedLayout]) -> None:
        """`relayout()` lays out the fused linears' weights (`fuse_linears`); it runs once the attention backend
        has started readying its kernels."""
        self.original_attention = original_attention  # restored if optimize() fails or runs again
        self.dtype, self.device = next(model.parameters()).dtype, model.device
        self.kv_dtype = kv_quant.cache_dtype(config.kv_cache_dtype, self.dtype)  # the KV pages' element type
        self.layers = discover_layers(model)  # layer i's attention configuration
        self.attention_configs = tuple(dict.fromkeys(self.layers))
        # An FP8 cache's per-layer (k_scale, v_scale): the model's own (a checkpoint's), 1.0 without them; optimize()
        # calibrates them instead with `calibrate_kv_scales`.
        self.kv_scales: list[tuple[float, float]] | None = None
        if kv_quant.is_fp8(self.kv_dtype) and not config.calibrate_kv_scales:
            self.kv_scales = checkpoint_scales(model, len(self.layers))
        self.attention_backend = attention_backends.choose(config.attention_backend, self.attention_configs,
                                                           self.dtype, self.device, self.kv_dtype)
        # The attention backend readies its kernels from here on (FlashInfer: a JIT build of ~26 s on a fresh
        # machine, the longest part of a fresh optimize()), while the weights are laid out and the step traced;
        # `_build` waits for them. So it starts first, as soon as the layers' shapes are known.
        if config.fp8_attention:  # (decode rows on XQA: the backend must take it, and XQA run here)
            blocker = xqa.unavailable_reason(self.attention_backend.name, self.attention_configs, config.page_size,
                                             self.device, self.kv_dtype)
            if blocker:
                raise NanoFlowError(f"NanoFlowConfig.fp8_attention=True cannot run here: {blocker}; or leave "
                                    "fp8_attention off (decode attention over the FP8 cache then computes in 16 bits)")
        self.attention_ready = self.attention_backend.prepare(self.attention_configs, config.page_size,
                                                              kv_quant.query_dtype(self.dtype, self.kv_dtype),
                                                              self.device, self.kv_dtype, config.fp8_attention)
        self.attention_started = time.perf_counter()
        # the check's prompts, eager logits (and over plain K/V, for an FP8 cache): `check_probe`'s arguments
        self.probe: tuple[list[list[int]], torch.Tensor, torch.Tensor | None] | None = None
        self.cache_sized = False  # the KV cache is the one it keeps (CUDA graphs are captured on it)
        self.tensor_parallel = tp = tensor_parallel_of(model)  # this rank's TP group, if the model is sharded
        # Under TP, every rank's engine plans the same steps (`runtime.control_plane`): the driver's resolved
        # config (its measured budget) holds on every rank.
        self.plane = ControlPlane.of(tp, config.check_plans)
        # and where the world holds several TP groups, each is a data-parallel replica (`runtime.replicas`)
        self.replicas = Replicas.of(tp.group) if self.plane is not None and tp is not None else None
        self.config = (resolve(config, model, self.device, self.dtype) if self.plane is None
                       else self.plane.share(lambda: resolve(config, model, self.device, self.dtype)))
        self.layout = relayout()
        self.follow_model = model_follower(model, self.dtype, self.device, self.layout)
        self.lowering = lowering_for(self.config, self.tensor_parallel)  # the passes every step is lowered through
        self.split_policy: SplitPolicy | None = (
            even_split(self.config, self.device) if self.config.nanobatched else None)
        self.search_pending = False  # num_nanobatches="auto": the search waits for the backend's kernels
        self.tunings: list[Any] = []  # num_nanobatches="auto": what the schedule search measured (cost.measure)
        self.decode_timings: list[DecodeTiming] = []  # and the memory unit's decode kernels per SM share
        self.cost_table: CostTable | None = None  # and the times it predicted the candidates from (cost.model)
        lowering = self.lowering  # (not `self`: the step would hold its runtime in a cycle)
        self.step_fn = StepFunction(
            model, lambda on_capture, on_lowered, skip_run, expand=None: make_backend(
                lowering, on_capture, on_lowered, skip_run, expand),
            step_store(model, self.config, self.lowering.key, self.attention_backend.name),
            find_layer_stack(model, self.layers) if self.config.replicate_layers and self.device.type != "meta"
            else None)
        self.capture_seconds = 0.0  # all of optimize()'s capture work; `timings` breaks it down
        self.timings: dict[str, float] = {}
        self.kv_cache: PagedKVCache
        self.runner: StepRunner
        self.engine: Engine

    def new_cache(self, num_pages: int, page_size: int | None = None) -> PagedKVCache:
        """A KV cache of `num_pages` pages for this model (its page size unless given): the configured element type
        and, for an FP8 cache, the runtime's scales."""
        page_size = page_size or self.config.page_size
        return PagedKVCache(self.layers, num_pages, page_size, self.kv_dtype, self.device,
                            model_dtype=self.dtype, kv_scales=self.kv_scales if kv_quant.is_fp8(self.kv_dtype)
                            else None,
                            xqa_width=-(-(self.config.max_seq_len or 0) // page_size) if self.config.fp8_attention
                            else 0)  # (resolved: max_seq_len is set)

    def replace_cache(self, num_pages: int) -> None:
        """Run on a new cache of `num_pages` pages, the current one's memory given back before the new one is
        allocated (the sizing counted it as free; on a GPU filled to its fraction both would not fit at once)."""
        self.kv_cache.release()
        gc.collect()  # (Dynamo's tracing leaves reference cycles that hold the traced step's inputs: these pages)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # (their blocks back to the driver: the new pages are tensors of other sizes)
        self.use_cache(self.new_cache(num_pages))

    def use_cache(self, kv_cache: PagedKVCache) -> None:
        """Run on `kv_cache` from now on (a new step runner and engine; the captured step is kept)."""
        self.kv_cache = kv_cache
        previous = getattr(self, "runner", None)
        self.runner = StepRunner(self.step_fn, kv_cache, self.config, self.attention_backend,
                                 self.attention_configs, self.split_policy)
        if previous is not None:  # steps on a stand-in kernel until the backend's are built (`_start_interim`)
            self.runner.carry_interim(previous)
        self.engine = Engine(self.runner, self.config, before_new_requests=self.follow_model, plane=self.plane)

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

    def agree_cuda_graphs(self) -> None:
        """Under tensor parallelism, every rank replays the same graphs: a step padded to another bucket on one
        rank would all-reduce a message of another size. Graphs stay on only if every rank captured them, routed
        as rank 0 routed its buckets (`cuda_graphs.route_buckets` times each rank's replays)."""
        plane, graphs = self.plane, self.runner.cuda_graphs
        if plane is None:
            return
        if not plane.agree_min(int(graphs is not None)):
            self.runner.cuda_graphs = None
            self.runner.cuda_graphs_off_reason = self.runner.cuda_graphs_off_reason or "another TP rank has none"
        elif graphs is not None:
            graphs.route = plane.share(lambda: graphs.route)

    @property
    def fused_linear_groups(self) -> int:
        return len(self.layout.groups)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A deep copy of an optimized model gets no runtime (its KV cache, captured step and CUDA graphs belong
        to the original); its generate() says to call optimize() on it."""
        return None


def even_split(config: NanoFlowConfig, device: torch.device) -> Callable[[int, int], Cut]:
    """The split policy of a fixed nano-batch count: every eager step cut into `num_nanobatches` nano-batches of
    equal size (fewer when it has fewer tokens), on the units `experimental.sm_partition` names."""
    n = int(config.num_nanobatches)
    units = (make_units(config.experimental.sm_partition, config.experimental.memory_sms) if device.type == "cuda"
             else None)
    return lambda tokens, decodes: Cut(Split.even(tokens, min(n, tokens)).boundaries, units)


def step_store(model: PreTrainedModel, config: NanoFlowConfig, lowering_key: str,
                backend_name: str) -> StepStore | None:
    """Where this model's captured step is saved (`NanoFlowConfig.save_step`), or None."""
    if not config.save_step or os.environ.get("NANOFLOW_FX_SAVE_STEP") == "0" or model.device.type == "meta":
        return None
    # What the captured graph depends on of the config: the cache's page shape and dtype (an FP8 cache's step reads
    # its scales) and the lowering (its passes). The step's sizes (tokens, requests, pages) are symbolic, so the
    # budgets (max_num_tokens: measured, "auto") do not count, and neither does the nano-batch count: a cut is
    # chosen per step at run time.
    fields = {"page_size": config.page_size, "kv_cache_dtype": config.kv_cache_dtype, "lowering": lowering_key}
    return StepStore(os.path.join(cache_root(config), "steps"), step_key(model, fields, backend_name))


def start_interim(model: PreTrainedModel, runtime: NanoFlowRuntime, begin: float) -> bool:
    """If the attention backend's kernels are still being built, run the steps on its stand-in until they are
    (`NanoFlowConfig.interim_attention`); returns whether it did. At the first step after the build, `switch`
    checks the backend's step against the eager probe logits and captures the CUDA graphs; a failed build or
    check keeps the stand-in for good, with a warning (its steps were checked: correct, slower)."""
    preparation, cfg = runtime.attention_ready, runtime.config
    if preparation is None or preparation.done() or not cfg.interim_attention:
        return False
    stand_in = runtime.attention_backend.interim_backend(runtime.attention_configs, runtime.dtype, runtime.device,
                                                         runtime.kv_dtype)
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
                check_probe(model, runner, *runtime.probe)
            except CaptureMismatchError as e:
                keep = f"its step failed the check against the eager model: {e}"
        if keep is not None:  # (the runner then keeps the stand-in for good)
            log.warning("nanoflow_fx: %s attention stays off: %s; steps keep running on %s's kernel (checked, "
                        "slower)", backend, keep, stand_in.name)
            return False
        if cfg.cuda_graphs and runtime.cache_sized:  # (else optimize() captures them once the cache is sized)
            runner.enable_cuda_graphs()
            runtime.agree_cuda_graphs()
        if runtime.search_pending:  # (num_nanobatches="auto": the search times the backend's own kernels)
            runtime.search_pending = False
            search_schedules(model, runtime, os.path.join(cache_root(cfg), "cost"))
        runtime.probe = None  # (the probe's logits served this check only)
        # when the switch happened (since optimize() began), and what it cost (the check, the CUDA graphs)
        runtime.timings.update(attention_switch_s=time.perf_counter() - begin,
                               attention_switch_cost_s=time.perf_counter() - started,
                               attention_build_s=preparation.seconds or 0.0)
        log.info("nanoflow_fx: %s attention ready %.1f s after optimize() began; its steps from now on",
                 backend, time.perf_counter() - begin)
        return True

    ready = preparation.done
    plane = runtime.plane
    if plane is not None:  # every TP rank switches at the same step: when every rank's kernels are built
        def ready() -> bool:
            return bool(plane.agree_min(int(preparation.done())))

    runtime.runner.run_interim(stand_in, ready, switch)
    log.info("nanoflow_fx: %s's kernels are still being built: the first steps run on %s's kernel", backend,
             stand_in.name)
    return True

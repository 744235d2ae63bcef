"""`CudaGraphRunner`: decode-sized steps replayed as CUDA graphs, one per token bucket.

Each bucket's graph is captured over static input tensors padded to a fixed `StepShape` (tokens, requests,
pages, logits rows): everything baked into its launches (grid sizes, buffer addresses, the attention
backend) is determined by the bucket, which is the graph's key, and by the runner's one KV cache (its pages' dtype,
which picks the kernels, and the addresses of its pages and FP8 scales; the scales' values are read at each replay):
the runner never changes its cache, and a new cache gets a new step runner and new graphs
(`NanoFlowRuntime.use_cache`). Buckets are captured largest first into one
memory pool. Steps larger than the largest bucket (long prefills) run the captured step directly, where
launch overhead is small next to the work. Capture needs a backend without host syncs ("triton", or
"flashinfer", whose per-step planning happens on the host before each replay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.context import StepContext, step_context
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, Planner
from nanoflow_fx.ops.split_metadata import split_attention_metadata
from nanoflow_fx.runtime.batch import Chunk, HostStaging, StepInputs, StepShape, build_step, feed_pending
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.program_runner import NanobatchStep, SplitPolicy, cut_bounds, planned_nanobatches

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # (what CUDAGraph.pool() returns and torch.cuda.graph takes)

__all__ = ["CudaGraphRunner", "decode_buckets", "route_buckets"]

log = logging.getLogger(__name__)


def decode_buckets(max_batch_size: int) -> list[int]:
    """Token buckets covering decode steps of up to max_batch_size tokens: 2, 4, 8, ..., 64, then +64."""
    buckets = [2]
    while buckets[-1] < max_batch_size:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 64 else buckets[-1] + 64)
    return buckets


def route_buckets(buckets: Sequence[int], replay_ms: dict[int, float], margin: float = 0.05) -> dict[int, int]:
    """bucket -> the fastest bucket at least as large, where that replays more than `margin` faster (a step may run
    in any graph at least its size: the rest is one-token padding)."""
    route = {}
    for i, bucket in enumerate(buckets):
        fastest = min(buckets[i:], key=lambda b: (replay_ms[b], b))
        if replay_ms[fastest] < (1 - margin) * replay_ms[bucket]:
            route[bucket] = fastest
    return route


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: StepInputs  # static tensors the graph reads
    logits: torch.Tensor  # static output [shape.logits, vocab]
    planner: Planner | None  # the bucket's own planner (backends that plan on the host)
    # The cut it was captured with (None: whole): each nano-batch's static metadata and its own planner (`plans`: a
    # planner with fixed buffers, re-planned before every replay, or None for backends that plan nothing).
    nanobatches: NanobatchStep | None = None


class CudaGraphRunner:
    def __init__(
        self, step_fn: StepFunction, kv_cache: PagedKVCache, max_batch_size: int, backend: AttentionBackend,
        last_tokens: torch.Tensor,
        attention_configs: Sequence[AttentionConfig] = (),
        staging: HostStaging | None = None,
        split_policy: SplitPolicy | None = None,
    ) -> None:
        """`last_tokens` is the engine's device-side table of each request's last sampled token; the graphs
        read PENDING input tokens from it (see `feed_pending`). A backend that plans on the host gives each
        bucket its own planner (fixed buffers), re-planned before every replay. Decode steps run whole (one
        nano-batch) unless `split_policy` cuts them (`ExperimentalConfig.split_decode_graphs`): then each bucket's
        graph is captured with the cut the policy gives its size, the nano-batches' streams forking from and
        joining the capture stream (`ProgramRunner`), each nano-batch's attention on a planner of its own. The cut
        is part of the graph (`_Graph.nanobatches`), fixed at capture. Splitting a decode step reads every weight
        once more per nano-batch: on one GPU that is not won back (docs/findings.md)."""
        self.step_fn, self.kv_cache, self.backend, self.last_tokens = step_fn, kv_cache, backend, last_tokens
        self.attention_configs = tuple(attention_configs)
        self.staging = staging  # the step runner's host buffers, where each replay's inputs are packed
        self.split_policy = split_policy
        self.buckets = decode_buckets(max_batch_size)
        self.graphs: dict[StepShape, _Graph] = {}
        self.capture_seconds = 0.0
        self.replay_ms: dict[int, float] = {}  # each bucket's graph replayed on its capture inputs
        self.route: dict[int, int] = {}  # bucket -> the larger bucket its steps replay in, where that is faster
        # A backend that plans on the host (FlashInfer) takes an FP8 cache's scales as host floats, which a capture
        # freezes: a graph captured before `PagedKVCache.set_scales` is captured again before its next replay.
        self.scales_version = kv_cache.scales_version

    @property
    def decode_only(self) -> bool:
        """A backend that plans on the host sizes captured launches by the capture's plan: its graphs serve
        only steps of one-token requests, whose plans all have the bucket's shape (see `flashinfer_attention`)."""
        return self.backend.plans_on_host

    def shape_for(self, num_tokens: int, num_logits: int, all_decodes: bool = True) -> StepShape | None:
        """The bucket shape a step of `num_tokens` tokens replays in, or None (then it runs eagerly)."""
        if self.decode_only and not all_decodes:
            return None
        for bucket in self.buckets:
            if num_tokens <= bucket:  # padding tokens are one-token requests: see `build_step`
                shape = self._shape(self.route.get(bucket, bucket))
                return shape if num_logits <= shape.logits else None
        return None

    def _shape(self, bucket: int) -> StepShape:
        """The static shape of `bucket`'s graph."""
        return StepShape(bucket, bucket, self.kv_cache.allocator.num_pages + bucket, bucket)

    def capture_all(self, measure: bool = True) -> None:
        """Capture every bucket, largest first (later, smaller graphs reuse the pool's blocks); then, with `measure`,
        time them and route buckets (`_measure_buckets`)."""
        start = time.perf_counter()
        self.scales_version = self.kv_cache.scales_version
        pool = None
        for bucket in reversed(self.buckets):
            shape = self._shape(bucket)
            self.graphs[shape] = self._capture(shape, pool)
            pool = self.graphs[shape].graph.pool()
        torch.cuda.synchronize()
        if measure:
            self._measure_buckets()
        self.capture_seconds = time.perf_counter() - start
        log.info("nanoflow_fx: captured %d CUDA graphs (buckets %s; steps of bucket -> replayed in %s) in %.1f s",
                 len(self.graphs), self.buckets, self.route or "their own", self.capture_seconds)

    def recapture(self) -> None:
        """Capture every bucket again (the KV scales changed since: see `scales_version`), keeping the routes (under
        tensor parallelism every rank's, agreed when first captured)."""
        log.info("nanoflow_fx: the FP8 KV scales changed: capturing the CUDA graphs again")
        self.graphs.clear()
        torch.cuda.synchronize()
        self.capture_all(measure=False)

    def _measure_buckets(self, replays: int = 3) -> None:
        """Time each bucket's graph (its capture inputs: one-token padding requests, so mostly the GEMMs and the
        elementwise work) and route a bucket's steps to a larger bucket's graph where that replays >5% faster.
        cuBLAS does not always get faster with fewer rows: its kernel choice for some row counts is slower than for
        a larger bucket's, so a step can run faster padded into the larger graph (benchmarks/RESULTS.md, "CUDA-graph
        buckets"; measured by benchmarks/bench_buckets.py)."""
        for bucket in self.buckets:
            graph = self.graphs[self._shape(bucket)].graph
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            self.replay_ms[bucket] = start.elapsed_time(end) / replays
        self.route = route_buckets(self.buckets, self.replay_ms)

    def _capture(self, shape: StepShape, pool: _POOL_HANDLE | None) -> _Graph:
        cache = self.kv_cache
        host = build_step([], cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                          backend=self.backend.name, shape=shape, pin=True,  # only padding: writes scratch only
                          kv_scales=cache.scales)
        inputs = host.to(cache.device)
        # The captured launches read the bucket's planners' buffers, which each replay re-plans (`run`): one planner
        # for a whole step, or one per nano-batch (in the record) for a cut one.
        nanobatches = self._nanobatches(shape, host) if self.split_policy is not None else None
        planner, plans = None, None
        if nanobatches is None:
            planner = cache.make_planner(self.backend, self.attention_configs, shape.requests, shape.pages)
            plans = planner.plan(host.metadata, inputs.metadata.kv_indices) if planner is not None else None
        context = StepContext(plans=plans, nanobatches=nanobatches)

        def step() -> torch.Tensor:
            input_ids = feed_pending(inputs.input_ids, inputs.feed_slots, self.last_tokens)
            with step_context(context):
                return self.step_fn(input_ids, inputs.position_ids, inputs.logits_indices, inputs.metadata)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Dynamo guards, Triton compilation, allocator
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = step()
        return _Graph(graph, inputs, logits, planner, nanobatches)

    def _nanobatches(self, shape: StepShape, host: StepInputs) -> NanobatchStep | None:
        """The static nano-batch record of `shape`'s graph, if the split policy cuts a decode step of its size."""
        assert self.split_policy is not None
        cut = self.split_policy(shape.tokens, shape.tokens)  # (every token of a decode bucket is a decode)
        bounds = cut_bounds(cut, shape.tokens)
        if bounds is None:
            return None
        assert cut is not None
        boundaries, attention = bounds
        cache = self.kv_cache
        sizes = _nanobatch_sizes(attention, shape)
        parts = split_attention_metadata(*host.metadata.tensors()[:4], cache.page_size, attention, pad=sizes,
                                         pin=True)
        planners = [cache.make_planner(self.backend, self.attention_configs, rows, pages) for rows, pages in sizes]
        return planned_nanobatches(parts, planners, cache.device, cut.units, boundaries, attention)

    def run(self, chunks: Sequence[Chunk], shape: StepShape, all_logits: bool) -> torch.Tensor:
        """Fill the bucket's static inputs from the host, replay, and return the real logits rows."""
        if self.backend.plans_on_host and self.scales_version != self.kv_cache.scales_version:
            self.recapture()
        cache, entry = self.kv_cache, self.graphs[shape]
        host = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                          all_logits, backend=self.backend.name, shape=shape, pin=True, staging=self.staging,
                          pad_pages=False, kv_scales=cache.scales)
        targets, sources = _step_tensors(entry.inputs), _step_tensors(host)
        for dst, src in zip(targets, sources):  # (the page list fills the front of its buffer: see build_step)
            dst[: src.shape[0]].copy_(src, non_blocking=True)  # from pinned memory: the host does not wait
        split = entry.nanobatches
        if split is not None:  # each nano-batch's table into its static tensors, then its planner
            attention = split.attention_boundaries or split.boundaries
            parts = split_attention_metadata(*host.metadata.tensors()[:4], cache.page_size, attention,
                                             pad=_nanobatch_sizes(attention, shape), pin=True, pad_pages=False)
            for part, static, planner in zip(parts, split.metadata, split.plans):
                for dst, src in zip(static, part):
                    dst[: src.shape[0]].copy_(src, non_blocking=True)
                if planner is not None:
                    planner.plan_tables(part[0], part[1], part[3], static[2])
        elif entry.planner is not None:
            entry.planner.plan(host.metadata, entry.inputs.metadata.kv_indices)
        entry.graph.replay()
        return entry.logits[: host.num_logits]


def _nanobatch_sizes(attention: tuple[int, ...], shape: StepShape) -> tuple[tuple[int, int], ...]:
    """Each attention nano-batch's table sizes in a decode bucket's graph: its rows (each a one-token request) and
    room for every page."""
    return tuple((end - start, shape.pages) for start, end in zip(attention[:-1], attention[1:]))


def _step_tensors(inputs: StepInputs) -> tuple[torch.Tensor, ...]:
    return (inputs.input_ids, inputs.position_ids, inputs.feed_slots, inputs.logits_indices,
            *inputs.metadata.tensors())

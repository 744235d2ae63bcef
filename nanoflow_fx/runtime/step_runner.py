"""`StepRunner`: executes one step's chunks on the captured step. It schedules nothing and owns no requests.

It builds the step's token-packed inputs on the host, plans the attention backend for them, and runs either
the captured step directly or, for decode-sized steps, a CUDA graph of the step's bucket. It owns the
device-side table of each running request's last sampled token (by slot), from which a step's PENDING input
tokens are read (`batch.feed_pending`), so the host never waits for the GPU between steps.

While the attention backend's kernels are still being built (FlashInfer's JIT build on a fresh machine), the
runner can run its steps on an interim backend (`run_interim`): the same captured step, its attention calls
computed by the stand-in's kernel (the step context's substitute: `nanoflow_fx.context`), eagerly. It switches at
the first step after the build is done.

Each step's context (`nanoflow_fx.context.StepContext`: its attention plans, the interim kernel, its cut into
nano-batches, a piece timer) is set by the runner around the step's call; the lowered step reads it there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.context import StepContext, step_context
from nanoflow_fx.errors import KVCacheExhaustedError
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, Planner
from nanoflow_fx.ops.split_metadata import split_attention_metadata
from nanoflow_fx.runtime.batch import Chunk, HostStaging, build_step, feed_pending, to_device
from nanoflow_fx.runtime.cuda_graphs import CudaGraphRunner
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.program_runner import NanobatchStep, PieceTimer, SplitPolicy, cut_bounds, planned_nanobatches
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["StepRunner"]

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), min_new_tokens=0)


RUNNER_POLICY: Any = "runner"
"""The `split` argument that means: cut the step as the runner's own `split_policy` says."""

Switch = Callable[["StepRunner"], bool]
"""Run once the interim ends: readies the runner for its own backend (checks it, captures CUDA graphs); returns
whether to switch (False: keep running on the interim backend)."""


@dataclass(frozen=True)
class CapturedStep:
    """A step captured in a CUDA graph (`StepRunner.capture_step`): `replay()` reruns it and returns the logits it
    writes. `inputs` holds what the graph's kernels read (the step's device inputs, its nano-batch record and
    metadata): they must live as long as the graph, or their memory could be handed to other tensors."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    inputs: Any

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class StepRunner:
    """Runs token-packed steps of the captured step on `kv_cache` (see the module docstring)."""

    def __init__(
        self,
        step_fn: StepFunction,
        kv_cache: PagedKVCache,
        config: NanoFlowConfig,
        backend: AttentionBackend,
        attention_configs: Sequence[AttentionConfig],
        split_policy: SplitPolicy | None = None,
    ) -> None:
        """`attention_configs`: the model's distinct attention layer configurations (what a planner plans).
        `split_policy` cuts eager steps into nano-batches (None: every step whole); the cut reaches the captured
        step's `ProgramRunner` in the step context."""
        self.step_fn, self.kv_cache, self.config, self.backend = step_fn, kv_cache, config, backend
        self.attention_configs = tuple(attention_configs)
        self.split_policy = split_policy
        self._nanobatch_planners: list[Planner | None] = []
        self.planner: Planner | None = kv_cache.make_planner(backend, self.attention_configs)
        # Reused host buffers for each step's inputs (CUDA: they are copied to the device; see HostStaging).
        self.staging = HostStaging() if kv_cache.device.type == "cuda" else None
        self.cuda_graphs: CudaGraphRunner | None = None  # set by enable_cuda_graphs()
        self.cuda_graphs_off_reason = "not enabled"
        self._slots: tuple[tuple[int, ...], torch.Tensor | None] = ((), None)  # record_tokens' last slots, on device
        # Each running request's last sampled token, on the device, by slot (see requests.PENDING).
        self.last_tokens = torch.zeros(config.max_batch_size, dtype=torch.int64, device=kv_cache.device)
        self.stats = {"graph_steps": 0, "eager_steps": 0, "interim_steps": 0}
        # run_interim(): the backend standing in for `backend` until `_interim_ready()`, and what then switches
        self.interim: AttentionBackend | None = None
        self._interim_ready: Callable[[], bool] = lambda: False
        self._interim_switch: Switch | None = None

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def planner_wait_s(self) -> float:
        """Host time its planners spent waiting for the device (FlashInfer re-plans only after its previous
        plan's copies ran)."""
        graphs = self.cuda_graphs.graphs.values() if self.cuda_graphs else ()
        planners = [self.planner, *self._nanobatch_planners, *(g.planner for g in graphs),
                    *(p for g in graphs if g.nanobatches is not None for p in g.nanobatches.plans)]
        return sum(getattr(p, "wait_s", 0.0) for p in planners if p is not None)

    @property
    def num_slots(self) -> int:
        return self.last_tokens.shape[0]

    def run_interim(self, backend: AttentionBackend, ready: Callable[[], bool], switch: Switch) -> None:
        """Run steps with `backend`'s kernel standing in for this runner's backend until `ready()` says the
        backend's own kernels are ready; the first step after that calls `switch(self)` first, and from then on
        steps plan and run on the runner's backend (if `switch` returned True; else on `backend` for good).
        `backend` must plan nothing on the host (the captured step passes it the device metadata)."""
        if backend.plans_on_host:
            raise ValueError(f"an interim backend must not plan on the host ({backend.name!r} does)")
        self.interim, self._interim_ready, self._interim_switch = backend, ready, switch

    def carry_interim(self, previous: StepRunner) -> None:
        """Take over `previous`'s interim, if it still has one (a runner made for a new KV cache)."""
        if previous.interim is not None:
            self.interim, self._interim_ready = previous.interim, previous._interim_ready
            self._interim_switch = previous._interim_switch

    def end_interim(self) -> bool:
        """Switch now if the interim is over (its `ready()`), instead of at the next step; returns whether steps
        now run on the runner's own backend."""
        if self.interim is not None and self._interim_ready():
            self._end_interim()
        return self.interim is None

    def _end_interim(self) -> None:
        interim, ready, switch = self.interim, self._interim_ready, self._interim_switch
        self.interim, self._interim_switch = None, None  # `switch` runs its check on the runner's own backend
        try:
            switched = switch(self) if switch is not None else True
        except KVCacheExhaustedError:  # its check needs a few free pages: try again at a later step
            self.interim, self._interim_ready, self._interim_switch = interim, ready, switch
            return
        except BaseException:
            self.interim, self._interim_ready, self._interim_switch = interim, lambda: False, None
            raise
        if not switched:
            self.interim, self._interim_ready, self._interim_switch = interim, lambda: False, None

    def enable_cuda_graphs(self) -> bool:
        """Capture decode-bucket CUDA graphs now, if this runner can replay them; returns whether it did.

        They need a CUDA model and a backend without host syncs; decode steps replay whole unless
        `ExperimentalConfig.split_decode_graphs` asks for the split policy's cut in them too (fixed at capture).
        A model whose step syncs with the host (e.g. HF's fp32 grouped-MoE fallback calls .tolist()) fails to
        capture: it is logged. Whenever graphs stay off, the reason is in `cuda_graphs_off_reason` and every step
        runs the captured step directly (still correct).
        """
        reason = self._cuda_graphs_blocker()
        if reason:
            self.cuda_graphs_off_reason = reason
            return False
        split = self.split_policy if self.config.experimental.split_decode_graphs else None
        runner = CudaGraphRunner(self.step_fn, self.kv_cache, self.config.max_batch_size, self.backend,
                                 self.last_tokens, self.attention_configs, self.staging, split)
        try:
            runner.capture_all()
        except RuntimeError as err:
            torch.cuda.synchronize()
            self.cuda_graphs_off_reason = f"capture failed: {str(err).splitlines()[0]}"
            log.warning("nanoflow_fx: CUDA graphs off: %s", self.cuda_graphs_off_reason)
            return False
        self.cuda_graphs = runner
        self.cuda_graphs_off_reason = ""
        return True

    def _cuda_graphs_blocker(self) -> str:
        if self.device.type != "cuda":
            return "the model is not on CUDA"
        if self.interim is not None:
            return f"steps run on the interim {self.interim.name} kernel until {self.backend.name}'s are built"
        blocker = self.backend.graph_blocker()
        if blocker:
            return blocker
        return ""

    def run(self, chunks: Sequence[Chunk], all_logits: bool = False, split: Any = RUNNER_POLICY) -> torch.Tensor:
        """Run one step; returns logits of completing chunks in order ([N, vocab]), or of every token.

        The requests' pages must cover their chunks. The caller advances the requests (`num_cached`). `split`: the
        split policy of an eager step (default: the runner's own; None: whole); a decode step that a CUDA graph
        serves replays it whole."""
        if self.interim is not None:
            self.end_interim()
        shape = None
        if self.cuda_graphs is not None:
            num_logits = sum(c.num_tokens if all_logits else int(c.completes) for c in chunks)
            shape = self.cuda_graphs.shape_for(sum(c.num_tokens for c in chunks), num_logits,
                                               all(c.num_tokens == 1 for c in chunks))
        if shape is not None:
            self.stats["graph_steps"] += 1
            return self.cuda_graphs.run(chunks, shape, all_logits)  # type: ignore[union-attr]
        self.stats["eager_steps"] += 1
        return self._run_eager(chunks, all_logits, split=split)

    def run_eager(self, chunks: Sequence[Chunk], split: Any = RUNNER_POLICY,
                  timer: PieceTimer | None = None) -> torch.Tensor:
        """One step of `chunks` run eagerly (never from a CUDA graph), cut as `split` says (default: the runner's
        split policy); a `timer` marks each piece of a whole step."""
        return self._run_eager(chunks, False, split=split, timer=timer)

    def _run_eager(self, chunks: Sequence[Chunk], all_logits: bool, trace_only: bool = False,
                   split: Any = RUNNER_POLICY, timer: PieceTimer | None = None) -> torch.Tensor:
        prepared = self._prepare_eager(chunks, all_logits, trace_only, split, timer)
        if prepared is None:
            return torch.empty(0, dtype=torch.long, device=self.device)
        call, num_logits = prepared
        return call()[:num_logits]

    def _prepare_eager(self, chunks: Sequence[Chunk], all_logits: bool, trace_only: bool = False,
                       split: Any = RUNNER_POLICY, timer: PieceTimer | None = None,
                       ) -> tuple[Callable[[], torch.Tensor], int] | None:
        """Everything of an eager step up to the step function's call (inputs on the device, attention planned,
        the nano-batch record made: the step's context), and that call (its logits rows: the first
        `num_logits`)."""
        cache = self.kv_cache
        on_cuda = self.device.type == "cuda"  # built in pinned host memory, then copied without blocking
        host = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page,
                          torch.device("cpu") if on_cuda else self.device, all_logits, min_tokens=2,
                          backend=self.backend.name, pin=on_cuda, staging=self.staging, kv_scales=cache.scales)
        inputs = host.to(self.device) if on_cuda else host
        if trace_only:
            self.step_fn.trace(inputs.input_ids, inputs.position_ids, inputs.logits_indices, inputs.metadata)
            return None
        interim, record, plans = self.interim, None, None
        if interim is not None:  # the stand-in's kernel reads the device metadata: nothing to plan, no cut
            self.stats["interim_steps"] += 1
        else:
            policy = self.split_policy if split is RUNNER_POLICY else split
            record = self._nanobatch_record(chunks, host.metadata.tensors()[:4], inputs.input_ids.shape[0], policy)
            if record is None and self.planner is not None:
                plans = self.planner.plan(host.metadata, inputs.metadata.kv_indices)
        context = StepContext(plans=plans, substitute=interim, nanobatches=record, timer=timer)
        input_ids = feed_pending(inputs.input_ids, inputs.feed_slots, self.last_tokens)

        def call() -> torch.Tensor:
            with step_context(context):
                return self.step_fn(input_ids, inputs.position_ids, inputs.logits_indices,
                                    inputs.metadata)

        return call, inputs.num_logits

    def capture_step(self, chunks: Sequence[Chunk], pool: Any = None, split: Any = RUNNER_POLICY) -> CapturedStep:
        """One eager step of `chunks` (split as the split policy says) captured in a CUDA graph: each replay
        recomputes that very step (same inputs, plans and nano-batch record), so the replays time its GPU work
        without the host's cost of issuing it (`cost.measure.StepHarness.time_graph`). The runtime does not
        replay mixed steps from such graphs: what they measure is what issuing split steps costs the host.
        Replay it before this runner's next step: that step plans again into the planners' buffers it reads."""
        prepared = self._prepare_eager(chunks, all_logits=False, split=split)
        assert prepared is not None
        call, num_logits = prepared
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()  # (a first run outside the capture: lazy initialisations and Dynamo's guards happen there)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = call()
        return CapturedStep(graph, logits[:num_logits], call)

    def _nanobatch_record(self, chunks: Sequence[Chunk], host: tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor], num_tokens: int,
                          policy: SplitPolicy | None) -> NanobatchStep | None:
        """The step's nano-batches, if `policy` cuts it: boundaries, each nano-batch's metadata on the device, and
        each one's attention plan (its own planner, planned here on the host)."""
        if policy is None:
            return None
        num_decode = 0
        for chunk in chunks:
            if chunk.num_tokens != 1:
                break
            num_decode += 1
        cut = policy(num_tokens, num_decode)
        bounds = cut_bounds(cut, num_tokens)
        if bounds is None:
            return None
        assert cut is not None  # (cut_bounds cuts nothing without one)
        boundaries, attention = bounds
        # one attention plan and metadata per attention nano-batch (the dense pieces' cut needs none)
        parts = split_attention_metadata(*host, self.kv_cache.page_size, attention, pin=self.device.type == "cuda")
        while len(self._nanobatch_planners) < len(parts):
            self._nanobatch_planners.append(self.kv_cache.make_planner(self.backend, self.attention_configs))
        return planned_nanobatches(parts, self._nanobatch_planners, self.device, cut.units, boundaries, attention)

    def run_prompts(self, prompts: Sequence[Sequence[int]], all_logits: bool = False,
                    trace_only: bool = False) -> torch.Tensor:
        """One step over fresh requests, each prefilling a whole prompt (the probe and the memory profile of
        `optimize()` use it); their pages are taken for the step and returned after it. `trace_only`: capture
        the step for these inputs without running it (`StepFunction.trace`; returns an empty tensor)."""
        allocator = self.kv_cache.allocator
        requests = [Request(f"probe_{i}", list(p), _GREEDY, 1) for i, p in enumerate(prompts)]
        try:
            for req in requests:
                req.pages = allocator.allocate(self.kv_cache.pages_for(len(req.prompt)))
            chunks = [Chunk(r, len(r.prompt)) for r in requests]
            if trace_only:
                return self._run_eager(chunks, all_logits, trace_only=True)
            return self.run(chunks, all_logits)
        finally:
            for req in requests:
                allocator.free(req.pages)

    def record_tokens(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        """Store each request's newly sampled token (on the device) where PENDING inputs are fed from."""
        if slots:
            key = tuple(slots)
            if key != self._slots[0]:  # decode steps complete the same requests step after step: copied once
                self._slots = (key, to_device(list(slots), torch.int64, self.device))
            on_device = self._slots[1]
            assert on_device is not None  # (set above: `key` is not empty, the initial key is)
            self.last_tokens.index_copy_(0, on_device, tokens.to(torch.int64))

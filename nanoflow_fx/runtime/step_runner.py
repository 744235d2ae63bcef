"""`StepRunner`: executes one step's chunks on the captured step. It schedules nothing and owns no requests.

It builds the step's token-packed inputs on the host, plans the attention backend for them, and runs either
the captured step directly or, for decode-sized steps, a CUDA graph of the step's bucket. It owns the
device-side table of each running request's last sampled token (by slot), from which a step's PENDING input
tokens are read (`batch.feed_pending`), so the host never waits for the GPU between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, Planner
from nanoflow_fx.runtime.batch import Chunk, build_step, feed_pending, to_device
from nanoflow_fx.runtime.cuda_graphs import CudaGraphRunner, decode_buckets
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.nanobatch import StepContext
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["StepRunner"]

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), min_new_tokens=0)


class StepRunner:
    """Runs token-packed steps of the captured step on `kv_cache` (see the module docstring)."""

    def __init__(
        self,
        step_fn: StepFunction,
        kv_cache: PagedKVCache,
        config: NanoFlowConfig,
        backend: AttentionBackend,
        attention_configs: Sequence[AttentionConfig],
        step_context: StepContext | None = None,
    ) -> None:
        """`attention_configs`: the model's distinct attention layer configurations (what a planner plans).
        `step_context` is shared with the nano-batch runner of a nano-batched step (the runner gives it each
        step's metadata on the host)."""
        self.step_fn, self.kv_cache, self.config, self.backend = step_fn, kv_cache, config, backend
        self.attention_configs = tuple(attention_configs)
        self.step_context = step_context
        self.planner: Planner | None = backend.make_planner(self.attention_configs, kv_cache.page_size,
                                                            kv_cache.dtype, kv_cache.device)
        self.cuda_graphs: CudaGraphRunner | None = None  # set by enable_cuda_graphs()
        self.cuda_graphs_off_reason = "not enabled"
        # Each running request's last sampled token, on the device, by slot (see requests.PENDING).
        self.last_tokens = torch.zeros(config.max_batch_size, dtype=torch.int64, device=kv_cache.device)
        self.stats = {"graph_steps": 0, "eager_steps": 0}
        # Nano-batched eager steps are padded to these token counts, so their split graphs stay few.
        self._nanobatch_buckets = decode_buckets(config.max_num_tokens) if config.nanobatched else []

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def planner_wait_s(self) -> float:
        """Host time its planners spent waiting for the device (FlashInfer re-plans only after its previous
        plan's copies ran)."""
        planners = [self.planner] + ([g.planner for g in self.cuda_graphs.graphs.values()] if self.cuda_graphs else [])
        return sum(getattr(p, "wait_s", 0.0) for p in planners if p is not None)

    @property
    def num_slots(self) -> int:
        return self.last_tokens.shape[0]

    def enable_cuda_graphs(self) -> bool:
        """Capture decode-bucket CUDA graphs now, if this runner can replay them; returns whether it did.

        They need a CUDA model and a backend without host syncs; nano-batched steps also need `sm_partition`
        set (the multi-stream path whose split metadata are static graph inputs). A model whose step syncs with
        the host (e.g. HF's fp32 grouped-MoE fallback calls .tolist()) fails to capture: it is logged. Whenever
        graphs stay off, the reason is in `cuda_graphs_off_reason` and every step runs the captured step
        directly (still correct).
        """
        reason = self._cuda_graphs_blocker()
        if reason:
            self.cuda_graphs_off_reason = reason
            return False
        runner = CudaGraphRunner(self.step_fn, self.kv_cache, self.config.max_batch_size, self.backend,
                                 self.last_tokens, self.attention_configs, self.step_context)
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
        blocker = self.backend.graph_blocker()
        if blocker:
            return blocker
        if self.config.nanobatched and (self.step_context is None or self.config.sm_partition == "off"):
            return "nano-batched steps replay CUDA graphs only with sm_partition set ('streams', 'soft' or 'hard')"
        return ""

    def run(self, chunks: Sequence[Chunk], all_logits: bool = False) -> torch.Tensor:
        """Run one step; returns logits of completing chunks in order ([N, vocab]), or of every token.

        The requests' pages must cover their chunks. The caller advances the requests (`num_cached`)."""
        shape = None
        if self.cuda_graphs is not None:
            num_logits = sum(c.num_tokens if all_logits else int(c.completes) for c in chunks)
            shape = self.cuda_graphs.shape_for(sum(c.num_tokens for c in chunks), num_logits,
                                               all(c.num_tokens == 1 for c in chunks))
        if shape is not None:
            self.stats["graph_steps"] += 1
            return self.cuda_graphs.run(chunks, shape, all_logits)  # type: ignore[union-attr]
        self.stats["eager_steps"] += 1
        return self._run_eager(chunks, all_logits)

    def _run_eager(self, chunks: Sequence[Chunk], all_logits: bool) -> torch.Tensor:
        cache = self.kv_cache
        min_tokens = self._padded_tokens(sum(c.num_tokens for c in chunks))
        on_cuda = self.device.type == "cuda"  # built in pinned host memory, then copied without blocking
        host = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page,
                          torch.device("cpu") if on_cuda else self.device, all_logits, min_tokens=min_tokens,
                          backend=self.backend.name, pin=on_cuda)
        inputs = host.to(self.device) if on_cuda else host
        if self.planner is not None:
            self.planner.plan(host.metadata, inputs.metadata.kv_indices)
        if self.step_context is not None:
            self.step_context.host = host.metadata.tensors()[:4]
        input_ids = feed_pending(inputs.input_ids, inputs.feed_slots, self.last_tokens)
        try:
            logits = self.step_fn(input_ids, inputs.position_ids, inputs.logits_indices, inputs.metadata)
        finally:
            if self.step_context is not None:
                self.step_context.host = None
        return logits[: inputs.num_logits]

    def _padded_tokens(self, num_tokens: int) -> int:
        """The token count a step is padded to: >= 2 always; a nano-batched step to its bucket (with room for
        the one padding request every step has, see `build_step`)."""
        for bucket in self._nanobatch_buckets:
            if num_tokens < bucket:
                return bucket
        return 2

    def run_prompts(self, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> torch.Tensor:
        """One step over fresh requests, each prefilling a whole prompt (the probe and the memory profile of
        `optimize()` use it); their pages are taken for the step and returned after it."""
        allocator = self.kv_cache.allocator
        requests = [Request(f"probe_{i}", list(p), _GREEDY, 1) for i, p in enumerate(prompts)]
        try:
            for req in requests:
                req.pages = allocator.allocate(self.kv_cache.pages_for(len(req.prompt)))
            return self.run([Chunk(r, len(r.prompt)) for r in requests], all_logits)
        finally:
            for req in requests:
                allocator.free(req.pages)

    def record_tokens(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        """Store each request's newly sampled token (on the device) where PENDING inputs are fed from."""
        if slots:
            index = to_device(list(slots), torch.int64, self.device)
            self.last_tokens.index_copy_(0, index, tokens.to(torch.int64))

"""`StepEngine`: admits requests into the paged KV cache, schedules token-packed steps and runs them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from nanoflow_fx.capture.step import StepFunction
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.errors import BatchTooLargeError, RequestTooLongError
from nanoflow_fx.ops.flashinfer_attention import AttentionConfig, FlashInferPlanner
from nanoflow_fx.runtime.batch import Chunk, Request, build_step, feed_pending, to_device
from nanoflow_fx.runtime.cuda_graphs import CudaGraphRunner
from nanoflow_fx.runtime.kv_cache import PagedKVCache
from nanoflow_fx.runtime.nanobatch import StepContext

__all__ = ["StepEngine"]

log = logging.getLogger(__name__)


class StepEngine:
    """Runs requests through the captured step.

    Pages for a request's whole budget (prompt + max_new_tokens) are reserved when it is admitted, so an
    admitted request can never run out of cache mid-generation and an oversized batch fails before any work.
    """

    def __init__(
        self,
        step_fn: StepFunction,
        kv_cache: PagedKVCache,
        config: NanoFlowConfig,
        attention_backend: str = "torch",
        attention_configs: Sequence[AttentionConfig] = (),
        step_context: StepContext | None = None,
    ) -> None:
        """`attention_configs` (the model's distinct attention layer configurations) are needed by the
        "flashinfer" backend, which plans each configuration before every step. `step_context` is shared with
        the nano-batch runner of a nano-batched step (the engine gives it each step's metadata on the host)."""
        self.step_context = step_context
        self.step_fn = step_fn
        self.kv_cache = kv_cache
        self.config = config
        self.attention_backend = attention_backend  # resolved: "torch", "triton" or "flashinfer"
        self.attention_configs = tuple(attention_configs)
        self.planner: FlashInferPlanner | None = None  # plans eager steps (graphs have their own)
        if attention_backend == "flashinfer":
            if not self.attention_configs:
                raise ValueError("the flashinfer backend needs the model's attention configurations")
            self.planner = FlashInferPlanner(self.attention_configs, kv_cache.page_size, kv_cache.caches[0].dtype,
                                             self.device)
        self.cuda_graphs: CudaGraphRunner | None = None  # set by enable_cuda_graphs()
        self.cuda_graphs_off_reason = "not enabled"
        # Each admitted request's last sampled token, on the device, by request slot (see batch.PENDING).
        self.last_tokens = torch.zeros(config.max_batch_size, dtype=torch.int64, device=self.device)
        self.stats = {"graph_steps": 0, "eager_steps": 0}

    def enable_cuda_graphs(self) -> bool:
        """Capture decode-bucket CUDA graphs now, if this engine can replay them; returns whether it did.

        They need a CUDA model and the "triton" or "flashinfer" attention backend (the reference kernel syncs
        with the host); nano-batched steps (Triton) also need `sm_partition` set, the multi-stream path whose
        split metadata are static graph inputs. A model whose step syncs with the host (e.g. HF's fp32
        grouped-MoE fallback calls .tolist()) fails to capture: it is logged. Whenever graphs stay off, the
        reason is in `cuda_graphs_off_reason` and every step runs the captured step directly (still correct).
        """
        reason = self._cuda_graphs_blocker()
        if reason:
            self.cuda_graphs_off_reason = reason
            return False
        runner = CudaGraphRunner(self.step_fn, self.kv_cache, self.config.max_batch_size, self.attention_backend,
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
        if self.attention_backend not in ("triton", "flashinfer"):
            return f"attention backend {self.attention_backend!r} syncs with the host (use 'triton' or 'flashinfer')"
        if self.config.nanobatched and (self.step_context is None or self.config.sm_partition == "off"):
            return "nano-batched steps replay CUDA graphs only with sm_partition set ('streams', 'soft' or 'hard')"
        return ""

    @property
    def device(self) -> torch.device:
        return self.kv_cache.caches[0].device

    def admit(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[Request]:
        """Create requests and reserve their pages; raises before reserving anything if they cannot fit."""
        cfg = self.config
        if len(prompts) > cfg.max_batch_size:
            raise BatchTooLargeError(
                f"batch of {len(prompts)} sequences exceeds NanoFlowConfig.max_batch_size={cfg.max_batch_size}; "
                "raise max_batch_size in optimize() or split the batch"
            )
        for i, prompt in enumerate(prompts):
            total = len(prompt) + max_new_tokens
            if total > cfg.max_seq_len:
                raise RequestTooLongError(
                    f"sequence {i}: prompt of {len(prompt)} tokens + {max_new_tokens} new tokens = {total} "
                    f"exceeds NanoFlowConfig.max_seq_len={cfg.max_seq_len}; raise max_seq_len in optimize() "
                    "or shorten the prompt / lower max_new_tokens"
                )
        need = [self.kv_cache.pages_for(len(p) + max_new_tokens) for p in prompts]
        pages = self.kv_cache.allocator.allocate(sum(need))  # all-or-nothing
        requests, start = [], 0
        for slot, (prompt, n) in enumerate(zip(prompts, need)):
            requests.append(Request(prompt=list(prompt), max_new_tokens=max_new_tokens, pages=pages[start : start + n],
                                    slot=slot))
            start += n
        return requests

    def record_tokens(self, requests: Sequence[Request], tokens: torch.Tensor) -> None:
        """Store each request's newly sampled token (on the device) where PENDING inputs are fed from."""
        if requests:
            slots = to_device([r.slot for r in requests], torch.int64, self.device)
            self.last_tokens.index_copy_(0, slots, tokens.to(torch.int64))

    def release(self, requests: Sequence[Request]) -> None:
        for req in requests:
            self.kv_cache.allocator.free(req.pages)
            req.pages = []

    def schedule(self, requests: Sequence[Request]) -> list[Chunk]:
        """Decode tokens first, then prefill chunks fill the rest of the `max_num_tokens` budget."""
        budget = self.config.max_num_tokens
        active = [r for r in requests if not r.finished and r.num_pending > 0]
        decodes = [r for r in active if r.num_cached >= len(r.prompt)]
        chunks = [Chunk(r, 1) for r in decodes]
        budget -= len(chunks)
        for req in active:
            if req.num_cached < len(req.prompt) and budget > 0:
                n = min(req.num_pending, budget)
                chunks.append(Chunk(req, n))
                budget -= n
        return chunks

    def run(self, chunks: Sequence[Chunk], all_logits: bool = False) -> torch.Tensor:
        """Run one step; returns logits of completing chunks in order ([N, vocab]), or of every token."""
        cache = self.kv_cache
        shape = None
        if self.cuda_graphs is not None:
            num_logits = sum(c.num_tokens if all_logits else int(c.completes) for c in chunks)
            shape = self.cuda_graphs.shape_for(sum(c.num_tokens for c in chunks), num_logits,
                                               all(c.num_tokens == 1 for c in chunks))
        if shape is not None:
            logits = self.cuda_graphs.run(chunks, shape, all_logits)  # type: ignore[union-attr]
            self.stats["graph_steps"] += 1
        else:
            if self.device.type == "cuda":  # built in pinned host memory, then copied without blocking
                host = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                                  all_logits, backend=self.attention_backend, pin=True)
                inputs = host.to(self.device)
                if self.planner is not None:
                    self.planner.plan(host.metadata, inputs.metadata.kv_indices)
            else:
                inputs = host = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, self.device,
                                           all_logits, backend=self.attention_backend)
            if self.step_context is not None:
                self.step_context.host = host.metadata.tensors()[:4]
            input_ids = feed_pending(inputs.input_ids, inputs.feed_slots, self.last_tokens)
            try:
                logits = self.step_fn(input_ids, inputs.position_ids, inputs.logits_indices, inputs.metadata)
            finally:
                if self.step_context is not None:
                    self.step_context.host = None
            logits = logits[: inputs.num_logits]
            self.stats["eager_steps"] += 1
        for chunk in chunks:
            chunk.request.num_cached += chunk.num_tokens
        return logits

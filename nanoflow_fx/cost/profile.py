"""Replaying dense steps on the device: what the schedule search measures its candidates with.

`StepHarness` holds the requests of one `StepShape` on a runtime's KV cache (decodes with `context - 1` tokens
cached, one prefill chunk; the cached KV is whatever the pages hold, which costs the kernels the same) and
times the runtime's step runner on them under a split policy: steps issued back to back, as the engine issues
them (the host prepares step i+1 while the GPU runs step i), CUDA events around the run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from nanoflow_fx.cost.search import StepShape
from nanoflow_fx.runtime.batch import Chunk
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["StepHarness"]

_GREEDY = SamplingParams(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), min_new_tokens=0)


class StepHarness:
    """The requests of `shape` on `runtime`'s cache (slots 0, 1, ...); `release()` returns their pages."""

    def __init__(self, runtime: Any, shape: StepShape, vocab_size: int, seed: int = 0) -> None:
        self.runtime, self.shape = runtime, shape
        cache = runtime.kv_cache
        gen = torch.Generator().manual_seed(seed)
        self.requests: list[Request] = []
        try:
            for i in range(shape.decodes):
                req = Request(f"tune_d{i}", torch.randint(3, vocab_size, (shape.context,), generator=gen).tolist(),
                              _GREEDY, 1, slot=i)
                req.pages = cache.allocator.allocate(cache.pages_for(shape.context))
                req.num_cached = shape.context - 1
                self.requests.append(req)
            if shape.prefill:
                req = Request("tune_p", torch.randint(3, vocab_size, (shape.prefill,), generator=gen).tolist(),
                              _GREEDY, 1, slot=shape.decodes)
                req.pages = cache.allocator.allocate(cache.pages_for(shape.prefill))
                self.requests.append(req)
        except BaseException:
            self.release()
            raise
        self.chunks = [Chunk(r, 1) for r in self.requests[: shape.decodes]]
        if shape.prefill:
            self.chunks.append(Chunk(self.requests[-1], shape.prefill))
        self.host_ms = 0.0

    @staticmethod
    def fits(runtime: Any, shape: StepShape) -> bool:
        cache, config = runtime.kv_cache, runtime.config
        pages = shape.decodes * cache.pages_for(shape.context) + cache.pages_for(shape.prefill)
        return (shape.decodes + 1 <= config.max_batch_size and pages <= cache.allocator.num_free
                and max(shape.context, shape.prefill) <= config.max_seq_len)

    def release(self) -> None:
        for req in self.requests:
            self.runtime.kv_cache.allocator.free(req.pages)
        self.requests = []

    def time(self, policy: Any, reps: int = 6, rounds: int = 3) -> float:
        """ms per step under `policy` (the median over `rounds` of `reps` back-to-back steps). `host_ms`: the host's
        time to issue one step (median; time its planners waited for the GPU excluded)."""
        runner = self.runtime.runner
        saved = runner.split_policy
        runner.split_policy = policy
        try:
            for _ in range(3):
                runner.run(self.chunks)
            torch.cuda.synchronize()
            times, host = [], []
            for _ in range(rounds):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    t0, waited = time.perf_counter(), runner.planner_wait_s
                    runner.run(self.chunks)
                    host.append((time.perf_counter() - t0 - (runner.planner_wait_s - waited)) * 1e3)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / reps)
        finally:
            runner.split_policy = saved
        self.host_ms = statistics.median(host)
        return statistics.median(times)

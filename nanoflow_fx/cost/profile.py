"""Replaying dense steps on the device: what the schedule search measures its candidates with.

`StepHarness` holds the requests of one `StepShape` on a runtime's KV cache (decodes with `context - 1` tokens
cached, one prefill chunk; the cached KV is whatever the pages hold, which costs the kernels the same) and
times the runtime's step runner on them under a split policy: steps issued back to back, as the engine issues
them (the host prepares step i+1 while the GPU runs step i), CUDA events around the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow_fx.cost.search import StepShape
from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.batch import Chunk
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["DecodeRows", "DecodeTiming", "StepHarness", "TRITON_DECODE_VARIANTS", "best_decode_kernels",
           "decode_kernel_timings", "decode_rows", "issue_ms", "time_on"]

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
                length = shape.prefix + shape.prefill
                req = Request("tune_p", torch.randint(3, vocab_size, (length,), generator=gen).tolist(),
                              _GREEDY, 1, slot=shape.decodes)
                req.pages = cache.allocator.allocate(cache.pages_for(length))
                req.num_cached = shape.prefix
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
        pages = shape.decodes * cache.pages_for(shape.context) + cache.pages_for(shape.prefix + shape.prefill)
        return (shape.decodes + 1 <= config.max_batch_size and pages <= cache.allocator.num_free
                and max(shape.context, shape.prefix + shape.prefill) <= config.max_seq_len)

    def release(self) -> None:
        for req in self.requests:
            self.runtime.kv_cache.allocator.free(req.pages)
        self.requests = []

    def time(self, policy: Any, reps: int = 6, rounds: int = 3) -> float:
        """ms per step under `policy` (the median over `rounds` of `reps` back-to-back steps). `host_ms`: the host's
        time to issue one step (median; time its planners waited for the GPU excluded)."""
        runner = self.runtime.runner
        for _ in range(3):
            runner.run(self.chunks, split=policy)
        torch.cuda.synchronize()
        times, host = [], []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                host.append(issue_ms(runner, lambda: runner.run(self.chunks, split=policy)))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        self.host_ms = statistics.median(host)
        return statistics.median(times)

    def time_graph(self, policy: Any, reps: int = 6, rounds: int = 3, pool: Any = None) -> float:
        """ms per step under `policy` with the host's issue cost removed: the step captured once in a CUDA graph
        (`StepRunner.capture_step`) and replayed back to back (median over `rounds` of `reps`). The runtime issues
        mixed steps eagerly: `time` is what it gets; this is what the same GPU work takes."""
        captured = self.runtime.runner.capture_step(self.chunks, pool, split=policy)
        stream = torch.cuda.current_stream()
        return statistics.median(time_on(captured.replay, stream, reps) for _ in range(rounds))


# The Triton kernel's launch variants the memory unit is tried with: tiles of 32-128 tokens, 4 warps, P @ V on
# tensor cores in tf32 (the kernel's default for half models) or with P rounded to bf16 (as FlashAttention and
# FlashInfer do: V feeds the MMA as loaded, which halves the kernel's shared-memory traffic per KV byte).
TRITON_DECODE_VARIANTS: tuple[tuple[tuple[str, Any], ...], ...] = tuple(
    (("block_n", b), ("num_stages", s), ("num_warps", 4), ("pv_precision", pv))
    for b, s, pv in ((64, 3, "tf32"), (128, 4, "tf32"), (32, 3, "half"), (64, 3, "half"), (128, 3, "half"),
                     (64, 5, "half")))


@dataclass(frozen=True)
class DecodeTiming:
    """One decode-attention kernel timed on one SM partition: ms per call, and the KV bytes it read per second."""

    sms: int
    kernel: DecodeKernel | None  # None: the step backend's own decode kernel
    ms: float
    tb_s: float


@dataclass(frozen=True)
class DecodeRows:
    """A shape's decode rows as an attention kernel sees them (layer 0): the request tables in pinned host memory
    (`host`) and on the device (`metadata`: qo_indptr, kv_indptr, kv_indices, kv_last_page_len), a random query,
    the layer's cache and configuration, and the KV bytes one pass reads."""

    host: tuple[torch.Tensor, ...]
    metadata: tuple[torch.Tensor, ...]
    q: torch.Tensor
    layer: torch.Tensor
    config: Any
    kv_bytes: int


@contextmanager
def decode_rows(runtime: Any, vocab_size: int, shape: StepShape) -> Iterator[DecodeRows]:
    """`shape`'s decodes at its context, held on `runtime`'s KV cache for the block (`StepHarness`)."""
    from nanoflow_fx.runtime.batch import build_step

    harness = StepHarness(runtime, StepShape(shape.decodes, shape.context, 0), vocab_size)
    try:
        cache = runtime.kv_cache
        step = build_step(harness.chunks, cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                          backend=runtime.attention_backend.name)
        host = tuple(t.pin_memory() for t in step.metadata.tensors()[:4])
        metadata = tuple(t.to(cache.device) for t in host)
        config = runtime.attention_configs[0]
        q = torch.randn(metadata[0].shape[0] - 1, config.num_qo_heads, config.head_dim, dtype=cache.dtype,
                        device=cache.device)
        kv_bytes = shape.decodes * shape.context * config.num_kv_heads * config.head_dim * 2 * cache.dtype.itemsize
        yield DecodeRows(host, metadata, q, cache.caches[0], config, kv_bytes)
    finally:
        harness.release()


def decode_kernel_timings(runtime: Any, vocab_size: int, shape: StepShape, shares: Sequence[int],
                          kernels: Sequence[DecodeKernel], reps: int = 10,
                          streams: Callable[[int], Any] | None = None) -> list[DecodeTiming]:
    """Time the decode rows of `shape` (`decode_rows`) on partitions of each of `shares` SMs (0: the whole GPU):
    the step backend's own decode kernel (planned as a nano-batch's) and each of `kernels`. `streams(sms)`: the
    stream of a partition (default: `green_context.split_sms`)."""
    from nanoflow_fx.runtime.green_context import split_sms

    streams = streams or (lambda sms: split_sms(sms)[0].stream)
    backend, cache = runtime.attention_backend, runtime.kv_cache
    with decode_rows(runtime, vocab_size, shape) as rows:
        host, metadata = rows.host, rows.metadata
        planner = backend.make_planner(runtime.attention_configs, cache.page_size, cache.dtype, cache.device)
        plan = planner.plan_tables(host[0], host[1], host[3], metadata[2]) if planner is not None else None
        timings = []
        for sms in shares:
            stream = streams(sms) if sms else torch.cuda.current_stream()
            for kernel in (None, *kernels):
                ms = time_on(lambda k=kernel: backend.run_planned(plan, rows.config, rows.q, rows.layer, metadata, k),
                             stream, reps)
                timings.append(DecodeTiming(sms, kernel, ms, rows.kv_bytes / ms / 1e9))
        return timings


def best_decode_kernels(timings: Sequence[DecodeTiming]) -> Mapping[int, DecodeKernel | None]:
    """Per SM share, the fastest kernel of `timings` (None where the step backend's own is fastest)."""
    best: dict[int, DecodeTiming] = {}
    for t in timings:
        if t.sms not in best or t.ms < best[t.sms].ms:
            best[t.sms] = t
    return {sms: t.kernel for sms, t in best.items()}


def issue_ms(runner: Any, step: Callable[[], Any]) -> float:
    """ms the host takes to issue `step()` on `runner` (a `StepRunner`), the time its planners waited for the GPU
    excluded (FlashInfer re-plans only after its previous plan's copies ran: a wait, not issue work)."""
    start, waited = time.perf_counter(), runner.planner_wait_s
    step()
    return (time.perf_counter() - start - (runner.planner_wait_s - waited)) * 1e3


def time_on(fn: Callable[[], Any], stream: Any, reps: int) -> float:
    """ms per call of `fn` issued `reps` times back to back on `stream` (after 3 warm-up calls), by CUDA events."""
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps

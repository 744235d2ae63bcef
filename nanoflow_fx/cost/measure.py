"""Measurement on the device: where the cost model's times and the search's replays come from.

`StepHarness` holds the requests of one `StepShape` on a runtime's KV cache (decodes with `context - 1` tokens
cached, one prefill chunk; the cached KV is whatever the pages hold, which costs the kernels the same) and
times the runtime's step runner on them under a split policy: steps issued back to back, as the engine issues
them (the host prepares step i+1 while the GPU runs step i), CUDA events around the run.

On it, what fills a `cost.model.CostTable`: `measure_shape` (each piece of the step program on a whole step of one
shape, and the host's time to issue it), `measure_split_host` (the host's time to issue the step cut in two),
`measure_carveout` (the GEMMs under cuBLASLt's SM carve-out), `measure_all_reduce` (an all-reduce over the TP
group per message size) and `decode_kernel_timings` (the decode rows'
attention per SM share and kernel). `predict_candidates` measures what a table lacks for a shape, then prices
every candidate; `tune` replays the candidates `cost.model.search_shape` names and picks per shape. `issue_ms`
(the host's issue time) and `time_on` (CUDA events on a stream) are the clocks they share.

Under tensor parallelism every rank runs the search together (each replay's collectives must meet): every time
measured passes through `agreed`, which gives each rank the slowest rank's time (and raises on every rank if any
rank failed), so the ranks' decisions, made from the same numbers, are the same.

This module imports the pure model (`cost.model`); the model never imports it.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from nanoflow_fx.cost.model import (
    Candidate,
    DecodeTiming,
    StepShape,
    Tuning,
    pick,
    policy_for,
    search_shape,
    shape_key,
)
from nanoflow_fx.errors import NanoFlowError, RankDivergenceError
from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.batch import Chunk, build_step
from nanoflow_fx.runtime.program_runner import PieceTimer, Units, make_units, sm_carveout
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["ALL_REDUCE_SIZES", "TRITON_DECODE_VARIANTS", "DecodeRows", "StepHarness", "agreed", "decode_kernel_timings",
           "decode_rows", "issue_ms", "measure_all_reduce", "measure_carveout", "measure_shape", "measure_split_host",
           "predict_candidates", "time_on", "tune"]


T = TypeVar("T")


def agreed(runtime: Any, measure: Callable[[], T]) -> T:
    """`measure()`, its times agreed across tensor-parallel ranks (`runtime.plane`; without one: as measured).
    Every rank calls it at the same point of the search: each float of the result (a float, or lists, tuples and
    dicts of them; pytree leaves) becomes the largest any rank measured (a step is as slow as its slowest rank);
    the rest of the result must be equal on every rank. If `measure()` raised on any rank it raises on every rank
    (the same exception where it raised, a `MeasurementError` naming the rank elsewhere), so the callers' fallbacks
    are taken everywhere alike."""
    plane = getattr(runtime, "plane", None)
    if plane is None:
        return measure()
    value: Any = None
    try:
        value, error = measure(), None
    except Exception as err:  # noqa: BLE001 - raised on every rank below
        error = err
    leaves, spec = tree_flatten(value)
    floats = [i for i, x in enumerate(leaves) if isinstance(x, float)]
    rest = [x for x in leaves if not isinstance(x, float)]
    mine = (None if error is None else f"{type(error).__name__}: {error}", repr((spec, rest)),
            [leaves[i] for i in floats])
    every = plane.gather(mine)
    failed = [r for r, (message, _, _) in enumerate(every) if message is not None]
    if failed:
        if error is not None:
            raise error
        raise MeasurementError(f"tensor-parallel rank {failed[0]} failed a measurement every rank makes: "
                               f"{every[failed[0]][0]}")
    differ = [r for r, (_, shape, _) in enumerate(every) if shape != mine[1]]
    if differ:
        raise RankDivergenceError(f"tensor-parallel ranks measured different things (rank {plane.rank}: {mine[1]}; "
                                  f"rank {differ[0]}: {every[differ[0]][1]}); every rank must search the same way")
    for i, slowest in zip(floats, map(max, zip(*(times for _, _, times in every), strict=True)), strict=True):
        leaves[i] = slowest
    return tree_unflatten(leaves, spec)


class MeasurementError(NanoFlowError):
    """Another tensor-parallel rank failed a measurement this rank made (`agreed`)."""


_GREEDY = SamplingParams(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), min_new_tokens=0)


# -- replaying a step shape -------------------------------------------------------------------------------------------
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
        """ms per step under `policy` (the median over `rounds` of `reps` back-to-back steps; CUDA events on CUDA,
        the host's clock elsewhere, where steps run synchronously). `host_ms`: the host's time to issue one step
        (median; time its planners waited for the GPU excluded)."""
        runner = self.runtime.runner
        cuda = self.runtime.device.type == "cuda"
        for _ in range(3):
            runner.run(self.chunks, split=policy)
        if cuda:
            torch.cuda.synchronize()
        times, host = [], []
        for _ in range(rounds):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            began = time.perf_counter()
            for _ in range(reps):
                host.append(issue_ms(runner, lambda: runner.run(self.chunks, split=policy)))
            if cuda:
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / reps)
            else:
                times.append((time.perf_counter() - began) * 1e3 / reps)
        self.host_ms = statistics.median(host)
        return statistics.median(times)

    def time_graph(self, policy: Any, reps: int = 6, rounds: int = 3, pool: Any = None) -> float:
        """ms per step under `policy` with the host's issue cost removed: the step captured once in a CUDA graph
        (`StepRunner.capture_step`) and replayed back to back (median over `rounds` of `reps`). The runtime issues
        mixed steps eagerly: `time` is what it gets; this is what the same GPU work takes."""
        captured = self.runtime.runner.capture_step(self.chunks, pool, split=policy)
        stream = torch.cuda.current_stream()
        return statistics.median(time_on(captured.replay, stream, reps) for _ in range(rounds))


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


# -- the cost table's times -------------------------------------------------------------------------------------------
def measure_shape(runtime: Any, vocab_size: int, shape: StepShape, reps: int = 3) -> tuple[dict[str, float], float]:
    """Each piece's ms on a whole eager step of `shape` (median over `reps`), and the host's ms to issue the step
    (`_issue_behind_sleep`; the fastest of `reps`: the host's noise only ever adds); `agreed` across TP ranks.
    On CUDA a sleep kernel queued first lets the host issue the whole step before the GPU reaches it, so the
    events between pieces time the GPU's work alone."""
    return agreed(runtime, lambda: _measure_shape(runtime, vocab_size, shape, reps))


def _measure_shape(runtime: Any, vocab_size: int, shape: StepShape, reps: int) -> tuple[dict[str, float], float]:
    samples: dict[str, list[float]] = {}
    host = []
    with _requests(runtime, vocab_size, shape, None) as step:
        step()
        for _ in range(reps):
            timer = PieceTimer(runtime.device.type == "cuda")
            host.append(_issue_behind_sleep(runtime, functools.partial(step, timer)))
            times = timer.piece_ms()
            for name, ms in times.items():
                samples.setdefault(name, []).append(ms)
    return {name: statistics.median(v) for name, v in samples.items()}, min(host)


def measure_split_host(runtime: Any, vocab_size: int, shape: StepShape, reps: int = 3) -> float:
    """The host's ms to issue `shape`'s step cut in two halves on one stream (`host_split_ms`; the fastest of
    `reps` after one warm-up, as `measure_shape` times the unsplit step's; `agreed` across TP ranks)."""
    def measure() -> float:
        with _requests(runtime, vocab_size, shape, policy_for(Candidate((0.5,)), make_units)) as step:
            step()
            return min(_issue_behind_sleep(runtime, step) for _ in range(reps))

    return agreed(runtime, measure)


@contextmanager
def _requests(runtime: Any, vocab_size: int, shape: StepShape, policy: Any) -> Iterator[Callable[..., Any]]:
    """`shape`'s requests on `runtime`'s cache (`StepHarness`); yields what runs one eager step of
    them cut by `policy` (a split policy; None: whole), given an optional piece timer. The pages are given back
    after."""
    runner = runtime.runner
    harness = StepHarness(runtime, shape, vocab_size)
    try:
        yield lambda timer=None: runner.run_eager(harness.chunks, split=policy, timer=timer)
    finally:
        harness.release()


def _issue_behind_sleep(runtime: Any, step: Any) -> float:
    """ms the host takes to issue `step()` (`issue_ms`: planners' waits excluded); on CUDA with a
    sleep kernel queued first (~50 ms at 2 GHz: longer than the host takes to issue a step), so that the GPU's
    work never holds the host up."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
    return issue_ms(runtime.runner, step)


def measure_carveout(runtime: Any, vocab_size: int, shape: StepShape, shares: Sequence[int],
                     pieces: Mapping[str, float], reps: int = 3) -> dict[int, float]:
    """Per SM share k: the dense pieces' ms on a whole step of `shape` with the GEMMs' carve-out of k SMs, over
    `pieces` (the same without it)."""
    program = runtime.step_fn.program
    dense = {p.name for p in program.pieces if p.kind == "dense"}
    base = sum(ms for name, ms in pieces.items() if name in dense)
    factors = {}
    for k in shares:
        with sm_carveout(k):
            times, _ = measure_shape(runtime, vocab_size, shape, reps)
        factors[k] = sum(ms for name, ms in times.items() if name in dense) / base if base > 0 else 1.0
    return factors


# The message sizes an all-reduce is timed at: 16 KiB (a decode step's hidden rows) to 32 MiB (a 2048-token
# prefill step of a 8192-wide model in bf16), by powers of two.
ALL_REDUCE_SIZES: tuple[int, ...] = tuple(16 * 1024 << i for i in range(12))


def measure_all_reduce(group: Any, device: torch.device, dtype: torch.dtype, sizes: Sequence[int] = ALL_REDUCE_SIZES,
                       reps: int = 20) -> dict[int, float]:
    """ms of one all-reduce (sum) over `group` per message size in bytes (`sizes`: multiples of `dtype`'s size),
    on `device`'s tensors: `reps` back to back after 3 warm-ups, CUDA events on CUDA, the host's clock elsewhere
    (gloo's all-reduce is synchronous). Every rank of `group` must call it with the same arguments (the
    collectives meet); the ranks' times differ by their wait for the slowest, so each returns its own. What
    `cost.model.CostTable.all_reduce` holds."""
    import torch.distributed as dist

    itemsize = torch.empty((), dtype=dtype).element_size()
    bad = [s for s in sizes if s <= 0 or s % itemsize]
    if bad:
        raise ValueError(f"message sizes {bad} are not positive multiples of {dtype}'s {itemsize} bytes")
    cuda = device.type == "cuda"
    times = {}
    for size in sizes:
        message = torch.ones(size // itemsize, dtype=dtype, device=device)
        for _ in range(3):
            dist.all_reduce(message, group=group)
        dist.barrier(group=group)
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                dist.all_reduce(message, group=group)
            end.record()
            end.synchronize()
            times[size] = start.elapsed_time(end) / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(message, group=group)
            times[size] = (time.perf_counter() - t0) * 1e3 / reps
    return times


# -- decode kernels on SM partitions ----------------------------------------------------------------------------------
# The Triton kernel's launch variants the memory unit is tried with: tiles of 32-128 tokens, 4 warps, P @ V on
# tensor cores in tf32 (the kernel's default for half models) or with P rounded to bf16 (as FlashAttention and
# FlashInfer do: V feeds the MMA as loaded, which halves the kernel's shared-memory traffic per KV byte).
TRITON_DECODE_VARIANTS: tuple[tuple[tuple[str, Any], ...], ...] = tuple(
    (("block_n", b), ("num_stages", s), ("num_warps", 4), ("pv_precision", pv))
    for b, s, pv in ((64, 3, "tf32"), (128, 4, "tf32"), (32, 3, "half"), (64, 3, "half"), (128, 3, "half"),
                     (64, 5, "half")))


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
    kv_scale: torch.Tensor | None = None  # the layer's FP8 scales (None: not an FP8 cache)


@contextmanager
def decode_rows(runtime: Any, vocab_size: int, shape: StepShape) -> Iterator[DecodeRows]:
    """`shape`'s decodes at its context, held on `runtime`'s KV cache for the block (`StepHarness`)."""
    harness = StepHarness(runtime, StepShape(shape.decodes, shape.context, 0), vocab_size)
    try:
        cache = runtime.kv_cache
        step = build_step(harness.chunks, cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                          backend=runtime.attention_backend.name, kv_scales=cache.scales)
        host = tuple(t.pin_memory() for t in step.metadata.tensors()[:4])
        metadata = tuple(t.to(cache.device) for t in host)
        config = runtime.attention_configs[0]
        q = torch.randn(metadata[0].shape[0] - 1, config.num_qo_heads, config.head_dim, dtype=cache.query_dtype,
                        device=cache.device)
        kv_bytes = shape.decodes * shape.context * config.num_kv_heads * config.head_dim * 2 * cache.dtype.itemsize
        yield DecodeRows(host, metadata, q, cache.caches[0], config, kv_bytes,
                         cache.scales[0] if cache.quantized else None)
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
    every = [(sms, kernel) for sms in shares for kernel in (None, *kernels)]
    with decode_rows(runtime, vocab_size, shape) as rows:
        host, metadata = rows.host, rows.metadata

        def measure() -> list[float]:
            planner = cache.make_planner(backend, runtime.attention_configs)
            plan = planner.plan_tables(host[0], host[1], host[3], metadata[2]) if planner is not None else None
            times = []
            for sms in shares:
                stream = streams(sms) if sms else torch.cuda.current_stream()
                for kernel in (None, *kernels):
                    def attend(k: DecodeKernel | None = kernel) -> torch.Tensor:
                        return backend.run_planned(plan, rows.config, rows.q, rows.layer, metadata, k, rows.kv_scale)

                    times.append(time_on(attend, stream, reps))
            return times

        times = agreed(runtime, measure)  # (under TP: the slowest rank's)
        return [DecodeTiming(sms, kernel, ms, rows.kv_bytes / ms / 1e9)
                for (sms, kernel), ms in zip(every, times, strict=True)]


# -- the search on the device -----------------------------------------------------------------------------------------
def predict_candidates(runtime: Any, vocab_size: int, table: Any, shape: StepShape,
                       space: Sequence[Candidate]) -> dict[Candidate, Any]:
    """Every candidate's prediction, after measuring the nano-batch shapes the table lacks (and the shape's own
    host time, unsplit and cut in two). Candidates the table cannot price (e.g. a share without decode timings)
    are left out."""
    needed = {shape_key(s): s for c in space for s in table.missing(shape, c)}
    if shape_key(shape) not in table.host_ms:
        needed[shape_key(shape)] = shape
    for key, part in needed.items():
        if not StepHarness.fits(runtime, part):
            continue
        try:
            table.pieces[key], host_ms = measure_shape(runtime, vocab_size, part)
        except Exception as err:  # noqa: BLE001 - the candidates that need it stay unpriced (and are not replayed)
            log.warning("nanoflow_fx: timing the pieces of %s failed (%s: %s)", part, type(err).__name__, err)
            continue
        if part == shape:
            table.host_ms[key] = host_ms
    if shape_key(shape) not in table.host_split_ms and shape.tokens > 1 and StepHarness.fits(runtime, shape):
        try:
            table.host_split_ms[shape_key(shape)] = measure_split_host(runtime, vocab_size, shape)
        except Exception as err:  # noqa: BLE001 - the host cost of more nano-batches is then assumed (cost.model)
            log.warning("nanoflow_fx: timing the host's issue of %s cut in two failed (%s: %s)", shape,
                        type(err).__name__, err)
    found = {}
    for candidate in space:
        prediction = table.predict(shape, candidate)
        if prediction is not None:
            found[candidate] = prediction
    return found


def tune(runtime: Any, vocab_size: int, shapes: Sequence[StepShape], space: Sequence[Candidate],
         make_units: Callable[[str, int], Units | None], reps: int = 4, rounds: int = 2, table: Any = None,
         top: int = 4) -> list[Tuning]:
    """Replay candidates of `space` on each shape that fits the runtime's cache (CUDA) and pick per shape. Without
    `table` every candidate is replayed; with a `cost.model.CostTable`, the pieces of each nano-batch shape the
    candidates cut are measured (those the table lacks), every candidate is predicted, the ones
    `cost.model.replay_order` names are replayed, and the table is calibrated with them. A candidate the device
    cannot run (e.g. a partition it cannot make) is skipped."""
    found = []
    for shape in shapes:
        if not StepHarness.fits(runtime, shape):
            continue
        start = time.perf_counter()
        runnable = [c for c in space if c.unsplit or c.cuts(shape.tokens, shape.decodes)]
        predictions = predict_candidates(runtime, vocab_size, table, shape, runnable) if table is not None else None
        harness = StepHarness(runtime, shape, vocab_size)
        def replay(c: Candidate, h: StepHarness = harness) -> float:
            # Under TP in two agreements: the candidate's units first (one a rank cannot make, e.g. a partition,
            # is skipped by every rank), then the replay's time (the slowest rank's). A rank failing inside the
            # step itself would leave the others waiting in its collectives; making the units is what fails.
            made: list[Any] = []
            agreed(runtime, lambda: made.append(policy_for(c, make_units)))
            return agreed(runtime, lambda: h.time(made[0], reps, rounds))

        try:
            measured = search_shape(runnable, replay, table, predictions, top, shape)
        finally:
            harness.release()
        found.append(Tuning(shape, tuple(measured.items()), pick(measured), time.perf_counter() - start,
                            tuple((c, p.ms) for c, p in (predictions or {}).items())))
    return found

"""`Engine`: continuous batching over the captured step (NanoFlow's dense batches, one request table).

Requests arrive at any time (`add_request`) and wait in FIFO order. Each `step()` asks the scheduler
(`scheduler.schedule`, a pure function of the table and the free pages) for the next dense batch, applies its
table changes (admissions get pages and a slot; preempted requests lose theirs and go back to the front of the
queue), has the step runner execute it, samples each completing request's next token with its own
parameters, and queues the tokens' copy back to the host. The host never waits for the step it just queued:
sampled tokens stay on the device (the next step reads them there, see `requests.PENDING`) and are read back
`MAX_LAG` steps later, where EOS is detected. A request that reaches `max_new_tokens` frees its pages at once;
one that sampled EOS frees them when the EOS is read back (the steps it ran ahead meanwhile are cut).

With `NanoFlowConfig.prefix_caching`, each request's full pages are registered in the prefix cache once their
K/V are computed and their tokens known on the host (`kv_cache.PageAllocator`); an admitted request shares the
longest cached chain of its first pages and computes only the rest. Released pages stay cached (a preempted
request's recomputation, a conversation's next round and requests sharing a system prompt hit them).

`generate()`, `generate_batch()` and the streaming manager are thin layers over one engine per optimized
model: calls from several threads become requests of the same engine (its lock serialises the steps).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoflow_fx.capture.tensor_parallel import vocab_size
from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.errors import InvalidInputError, KVCacheExhaustedError, RequestTooLongError
from nanoflow_fx.runtime.batch import to_device
from nanoflow_fx.runtime.control_plane import ControlPlane
from nanoflow_fx.runtime.kv_cache import HostPages, PageAllocator, page_bytes
from nanoflow_fx.runtime.requests import FAILED, FINISHED, PENDING, RUNNING, WAITING, Request
from nanoflow_fx.runtime.sampling import SamplingParams, sample_rows
from nanoflow_fx.runtime.scheduler import SchedulerLimits, StepPlan, schedule
from nanoflow_fx.runtime.step_runner import StepRunner

__all__ = ["Engine", "EngineStats", "MAX_LAG"]

log = logging.getLogger(__name__)

# Steps the host may run ahead of the tokens it has read back. The GPU keeps this many steps queued while the
# host reads step n - MAX_LAG's tokens (EOS detection), so it never idles waiting for the host.
MAX_LAG = 2
_LOG_EVERY_S = 10.0  # how often a long run logs the engine's state at INFO


@dataclass
class EngineStats:
    """Counters since the engine was made (tokens count what ran through the model, not what was kept)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled (incl. those past an EOS not yet read back)
    preemptions: int = 0
    finished: int = 0
    running_sum: int = 0  # sum over steps of running requests (mean running batch = running_sum / steps)
    kv_pages_used_sum: int = 0  # sum over steps of pages held
    step_s: float = 0.0  # host time inside step()
    readback_wait_s: float = 0.0  # of which blocked on the device, waiting for tokens MAX_LAG steps old
    prefix_lookup_tokens: int = 0  # (prefix caching) tokens of admitted requests (recomputations included)
    prefix_hit_tokens: int = 0  # of which found in the prefix cache: prefill tokens skipped
    prefix_host_hit_tokens: int = 0  # of which copied back from host memory (`prefix_offload_gib`)

    @property
    def mean_running(self) -> float:
        return self.running_sum / max(self.steps, 1)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of admitted requests' tokens the prefix cache held (0 without prefix caching)."""
        return self.prefix_hit_tokens / max(self.prefix_lookup_tokens, 1)


class _Readback:
    """One step's sampled tokens on their way to the host (a non-blocking copy into pinned memory)."""

    def __init__(self, tokens: torch.Tensor, targets: list[tuple[Request, int]]) -> None:
        self.targets = targets  # (request, index into its output) per token
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tokens, None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    """One optimized model's continuous-batching engine (see the module docstring)."""

    def __init__(self, runner: StepRunner, config: NanoFlowConfig, reserve_ratio: float | None = None,
                 before_new_requests: Callable[[], None] | None = None, plane: ControlPlane | None = None) -> None:
        """`reserve_ratio`: see `SchedulerLimits`; None adapts it to how much finished requests generated.
        `before_new_requests`: run (in the stepping thread, under the lock) by each step that takes newly added
        requests, before it schedules: the runtime checks there that the model was not moved or changed since
        `optimize()` (an error then ends the step's callers' requests with it). `plane`: under tensor
        parallelism, what makes each step's plan the same on every rank (`control_plane`): the engine asks it for
        the plan, defers cancellations to it, and samples from a generator it seeds."""
        self.runner, self.config, self.plane = runner, config, plane
        self.generator: torch.Generator | None = None  # sampling's random source (None: torch's global one)
        if plane is not None:
            self.generator = torch.Generator(runner.device).manual_seed(plane.seed())
        self.before_new_requests = before_new_requests
        self.kv_cache = runner.kv_cache
        self.vocab_size = vocab_size(runner.step_fn.model)  # (the whole vocabulary under tensor parallelism)
        allocator = self.kv_cache.allocator
        # Admission keeps 1% of the pages free (as vLLM does) and pages for the tokens running requests are
        # expected to generate: all their max_new_tokens at first, then the share finished requests really
        # generated (an average), so requests that end early at EOS let more in (see `scheduler`).
        assert config.max_num_tokens != "auto"  # (resolved by optimize(): `config.resolve`)
        self.limits = SchedulerLimits(config.max_num_tokens, runner.num_slots, self.kv_cache.page_size,
                                      watermark_pages=allocator.num_pages // 100,
                                      reserve_ratio=1.0 if reserve_ratio is None else reserve_ratio)
        self._adapt_reserve = reserve_ratio is None
        self._generated_share = 1.0
        self.waiting: deque[Request] = deque()
        self._inbox: deque[Request] = deque()  # added, not yet queued (appends are atomic: no lock needed)
        self.running: list[Request] = []  # admission order
        self.free_slots = list(range(runner.num_slots - 1, -1, -1))
        self.inflight: deque[_Readback] = deque()
        self.lock = threading.RLock()
        self.stats = EngineStats()
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._ids = itertools.count()
        self._last_log = time.perf_counter()
        self.prefix: _PrefixCache | None = None
        self.host_pages: HostPages | None = None
        if config.prefix_caching:
            allocator.key = _cache_key(runner)
            count = int(config.prefix_offload_gib * 2**30) // page_bytes(self.kv_cache.layers,
                                                                         self.kv_cache.page_size, self.kv_cache.dtype)
            if count > 0:
                self.host_pages = HostPages(self.kv_cache.caches, count)
                allocator.on_evict = self.host_pages.save
            self.prefix = _PrefixCache(allocator, self.kv_cache.page_size, self.host_pages)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int], params: SamplingParams, max_new_tokens: int,
                    request_id: str | None = None, streaming: bool = False,
                    listener: Callable[[Request], None] | None = None, record_timestamps: bool = False,
                    name: str | None = None) -> Request:
        """Queue a request; raises (before queueing) if it could never run: an empty prompt, token ids outside
        the vocabulary, more tokens than `max_seq_len`, or more KV pages than the whole cache. `name` says
        which request an error is about (default: its id)."""
        prompt = list(prompt)
        self.check_fits(prompt, max_new_tokens, name or request_id or "the request")
        request = Request(request_id or f"req_{next(self._ids)}", prompt, params, int(max_new_tokens),
                          arrival=next(self._arrivals), streaming=streaming, listener=listener,
                          timestamps=[] if record_timestamps else None)
        # Not under the lock, which a stepping thread holds for a whole step: the next step takes it from here.
        self._inbox.append(request)
        return request

    def check_fits(self, prompt: Sequence[int], max_new_tokens: int, name: str) -> None:
        """Raise if this request can never run on this engine."""
        prompt_len, vocab = len(prompt), self.vocab_size
        if prompt_len < 1:
            raise InvalidInputError(f"{name}: the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            position, token = next((i, t) for i, t in enumerate(prompt) if not 0 <= t < vocab)
            raise InvalidInputError(f"{name}: token {position} of the prompt, {token}, is not a token id of this "
                                    f"model (vocabulary of {vocab}: ids 0..{vocab - 1})")
        if max_new_tokens < 1:
            raise InvalidInputError(f"{name}: max_new_tokens={max_new_tokens} leaves nothing to generate")
        total, cfg = prompt_len + max_new_tokens, self.config
        assert cfg.max_seq_len is not None  # (resolved by optimize(): `config.resolve`)
        if total > cfg.max_seq_len:
            raise RequestTooLongError(
                f"{name}: prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {total} exceeds "
                f"NanoFlowConfig.max_seq_len={cfg.max_seq_len}; raise max_seq_len in optimize() or shorten the "
                "prompt / lower max_new_tokens")
        need, have = self.kv_cache.pages_for(total), self.kv_cache.allocator.num_pages
        if need > have:
            raise KVCacheExhaustedError(
                f"{name}: {total} tokens need {need} KV-cache pages, more than the whole cache holds ({have} pages of "
                f"{self.kv_cache.page_size} tokens); raise NanoFlowConfig.num_pages or kv_cache_memory_fraction, "
                "or shorten the request")

    def cancel(self, request: Request) -> None:
        """Drop a request (waiting or running): its pages and slot are freed at once; no result is delivered.
        Under tensor parallelism, at the next step on every rank (`ControlPlane.cancel`)."""
        if self.plane is not None:
            self.plane.cancel(request)
            return
        self.cancel_now(request)

    def cancel_now(self, request: Request) -> None:
        """`cancel`, on this engine now."""
        with self.lock:
            if not request.finished:
                self._take_inbox()
                request.listener = None
                self._detach(request)
                request.state = FINISHED

    def fail(self, requests: Sequence[Request], error: BaseException | str) -> None:
        """End requests with an error (their pages and slots freed); their listeners hear of it."""
        with self.lock:
            self._take_inbox()
            for req in requests:
                if self.plane is not None:  # (the other ranks drop their copies at the next step)
                    self.plane.cancel(req)
                if not req.finished:
                    self._detach(req)
                    req.error = str(error) or type(error).__name__
                    self._end(req, FAILED)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.inflight or self._inbox)

    def _take_inbox(self) -> None:
        while self._inbox:
            self.waiting.append(self._inbox.popleft())

    # ------------------------------------------------------------------------------------------- stepping
    def step(self) -> None:
        """Run one scheduling iteration (see the module docstring). Does nothing when there is no work."""
        with self.lock:
            start = time.perf_counter()
            try:
                self._step()
            finally:
                self.stats.step_s += time.perf_counter() - start

    def _step(self) -> None:
        plan = self._plan() if self.plane is None else self.plane.plan(self)
        if plan is None:  # (a tensor-parallel follower: the driver ended its session)
            return
        self._apply(plan)
        if not plan.chunks:
            if plan.loads:  # (the loading requests' chunks run next step)
                return
            if self.inflight:  # e.g. the queue's head waits for its last tokens: read them back
                self._resolve_oldest()
            elif self.waiting:
                raise RuntimeError(f"nanoflow_fx engine: {len(self.waiting)} waiting requests cannot be scheduled "
                                   "with nothing running (a request larger than the cache was admitted)")
            return
        try:
            self._run(plan)
        except BaseException as err:
            self.fail(list(self.running), err)
            raise
        while len(self.inflight) > MAX_LAG:
            self._resolve_oldest()
        self._maybe_log()

    def _plan(self) -> StepPlan:
        """The next plan (one process): new requests queued, tokens already on the host read back."""
        if self._inbox and self.before_new_requests is not None:
            self.before_new_requests()
        self._take_inbox()
        self._resolve(block=False)
        return schedule(self.running, self.waiting, self.kv_cache.allocator.num_free, self.limits, self.prefix)

    def run_until_done(self, requests: Sequence[Request]) -> None:
        """Step until every request in `requests` has finished (others in the table progress too)."""
        while not all(r.finished for r in requests):
            self.step()

    def _apply(self, plan: StepPlan) -> None:
        if self.host_pages is not None:
            self.host_pages.wait_loads()  # (the pages the last step's plan loaded: this step reads them)
        for req in sorted(plan.preempted, key=lambda r: r.arrival, reverse=True):
            self.running.remove(req)
            self._release(req)
            req.num_cached, req.state, req.admitted, req.num_registered = 0, WAITING, -1, 0
            req.num_preemptions += 1
            self.waiting.appendleft(req)  # the front: preempted requests go first, oldest first
        self.stats.preemptions += len(plan.preempted)
        if plan.preempted:
            log.debug("nanoflow_fx: preempted %s", [r.request_id for r in plan.preempted])
        now = time.perf_counter()
        for req in plan.admitted:
            head = self.waiting.popleft()  # admission takes the queue's head, in order (FIFO)
            if head is not req:
                raise RuntimeError("nanoflow_fx engine: the scheduler admitted a request out of queue order")
            req.slot, req.state, req.admitted = self.free_slots.pop(), RUNNING, next(self._admissions)
            if req.first_scheduled_time < 0:
                req.first_scheduled_time = now
            self.running.append(req)
        if self.prefix is not None:
            self._share(plan)
        for req, count in plan.new_pages:
            req.pages += self.kv_cache.allocator.allocate(count)
        if self.host_pages is not None:
            self.host_pages.flush()  # (the evicted pages go out before this step overwrites them)
        if plan.loads:
            self._load(plan)

    def _share(self, plan: StepPlan) -> None:
        """Give the admitted requests the cached pages they share (before any page is allocated: allocation may
        evict unreferenced cached pages, never those the plan shares)."""
        page_size, stats = self.kv_cache.page_size, self.stats
        for req, hits in plan.hits:
            self.kv_cache.allocator.acquire(hits)
            req.pages = list(hits)
            req.num_registered = len(hits)
            req.num_cached = len(hits) * page_size
            stats.prefix_hit_tokens += req.num_cached
        stats.prefix_lookup_tokens += sum(r.num_tokens for r in plan.admitted)
        if plan.loads:  # (held before this step's allocations evict pages to host memory)
            assert self.prefix is not None and self.host_pages is not None
            for req, count in plan.loads:
                first = req.num_registered  # (its shared pages)
                self.host_pages.hold(self.prefix.hashes(req, first + count)[first:])

    def _load(self, plan: StepPlan) -> None:
        """Copy the pages the plan found in host memory into the requests' first new pages, and cache them."""
        assert self.prefix is not None and self.host_pages is not None
        page_size, stats = self.kv_cache.page_size, self.stats
        for req, count in plan.loads:
            first = req.num_registered
            self.host_pages.load(self.prefix.hashes(req, first + count)[first:], req.pages[first:first + count])
            req.num_cached = (first + count) * page_size
            self.prefix.register(req)  # (its K/V are in place and its prompt known: cached again)
            stats.prefix_hit_tokens += count * page_size
            stats.prefix_host_hit_tokens += count * page_size

    def _run(self, plan: StepPlan) -> None:
        logits = self.runner.run(plan.chunks)
        completing = []
        prefix, page_size = self.prefix, self.kv_cache.page_size
        for chunk in plan.chunks:
            req = chunk.request
            req.num_cached += chunk.num_tokens
            if prefix is not None and req.num_cached >= (req.num_registered + 1) * page_size:
                prefix.register(req)
            if chunk.completes:
                completing.append(req)
        stats = self.stats
        stats.steps += 1
        decode = sum(1 for c in plan.chunks if c.num_tokens == 1 and c.start >= len(c.request.prompt))
        stats.decode_tokens += decode
        stats.prefill_tokens += plan.num_tokens - decode
        stats.running_sum += len(self.running)
        stats.kv_pages_used_sum += self.kv_cache.allocator.num_pages - self.kv_cache.allocator.num_free
        if not completing:
            return
        failed: list[tuple[list[int], Exception]] = []
        tokens = sample_rows(logits, [len(r.output) for r in completing], [r.params for r in completing],
                             lambda rows, err: failed.append((rows, err)), self.generator)
        if failed:
            completing, tokens = self._fail_sampling(completing, tokens, failed)
            if not completing:
                return
        self.runner.record_tokens([r.slot for r in completing], tokens)
        self.inflight.append(_Readback(tokens, [(r, len(r.output)) for r in completing]))
        stats.generated_tokens += len(completing)
        for req in completing:
            req.output.append(PENDING)
            if len(req.output) >= req.max_new_tokens:
                self._stop_generating(req)

    def _fail_sampling(self, completing: list[Request], tokens: torch.Tensor,
                       failed: list[tuple[list[int], Exception]]) -> tuple[list[Request], torch.Tensor]:
        """Fail the requests whose parameter group's sampling raised (rows of `completing`), with its error;
        the others keep their tokens. Every other request of the step runs on."""
        dropped: set[int] = set()
        for rows, err in failed:
            log.warning("nanoflow_fx: sampling failed for %d request(s) of one parameter set: %s", len(rows), err)
            self.fail([completing[r] for r in rows], err)
            dropped.update(rows)
        kept = [r for r in range(len(completing)) if r not in dropped]
        return [completing[r] for r in kept], tokens.index_select(0, to_device(kept, torch.int64, tokens.device))

    # ------------------------------------------------------------------------------------------- readback
    def _resolve(self, block: bool) -> None:
        while self.inflight and (block or self.inflight[0].ready()):
            self._resolve_oldest()

    def _resolve_oldest(self) -> None:
        """Write the oldest queued step's tokens into their requests; a request that sampled EOS ends there
        (tokens it ran ahead with are dropped; they were never visible)."""
        readback = self.inflight.popleft()
        touched: dict[Request, None] = {}
        start = time.perf_counter()
        tokens = readback.tokens()
        now = time.perf_counter()
        self.stats.readback_wait_s += now - start
        for (req, index), token in zip(readback.targets, tokens):
            if index >= len(req.output) or req.finished:
                continue  # cut at an earlier EOS, cancelled or failed
            req.output[index] = token
            if req.timestamps is not None:
                req.timestamps.append(now)
            touched[req] = None
            if token in req.params.eos_token_ids:  # (sampling kept EOS out before min_new_tokens)
                del req.output[index + 1 :]
                self._stop_generating(req)
        for req in touched:
            if req.done_generating and req.resolved and not req.finished:
                self._end(req, FINISHED)
            elif req.streaming and req.listener is not None and not req.finished:  # (an EOS above ended it: its
                req.listener(req)  # listener heard that end once, in `_end`)

    def _stop_generating(self, req: Request) -> None:
        """No more tokens for `req`; it ends as soon as its last tokens are read back."""
        self._detach(req)
        if req.resolved:
            self._end(req, FINISHED)

    def _detach(self, req: Request) -> None:
        """Take `req` out of the queue or the running set and free its pages and slot now (steps already queued
        on the device that use them run first, in stream order)."""
        req.done_generating = True
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def _release(self, req: Request) -> None:
        if self.prefix is not None:
            self.prefix.register(req)  # its computed full pages stay cached for later requests
        self.kv_cache.allocator.free(req.pages)
        req.pages = []
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1

    def _end(self, req: Request, state: str) -> None:
        req.state, req.finished_time = state, time.perf_counter()
        self.stats.finished += 1
        if state == FINISHED and self._adapt_reserve and req.max_new_tokens > 0:
            self._generated_share += 0.1 * (len(req.output) / req.max_new_tokens - self._generated_share)
            ratio = max(self._generated_share, 0.05)
            if abs(ratio - self.limits.reserve_ratio) > 0.02:
                self.limits = dataclasses.replace(self.limits, reserve_ratio=ratio)
        if req.listener is not None:
            req.listener(req)

    def _maybe_log(self) -> None:
        now = time.perf_counter()
        if now - self._last_log < _LOG_EVERY_S or not log.isEnabledFor(logging.INFO):
            return
        self._last_log = now
        alloc, host = self.kv_cache.allocator, self.host_pages
        log.info("nanoflow_fx engine: %d running, %d waiting, %d finished, %d preemptions, KV cache %.0f%% used, "
                 "mean running batch %.1f over %d steps%s%s", len(self.running), len(self.waiting),
                 self.stats.finished, self.stats.preemptions, 100 * (1 - alloc.num_free / max(alloc.num_pages, 1)),
                 self.stats.mean_running, self.stats.steps,
                 f", prefix cache hit rate {100 * self.stats.prefix_hit_rate:.0f}%" if self.prefix is not None else "",
                 f", host pages {host.num_used} of {host.num_pages}" if host is not None else "")


class _PrefixCache:
    """The engine's side of prefix caching: request token hashes (memoised on the request), what the scheduler
    reads (`scheduler.PrefixView`) and registration of computed pages."""

    def __init__(self, allocator: PageAllocator, page_size: int, host: HostPages | None = None) -> None:
        self.allocator, self.page_size, self.host = allocator, page_size, host
        self.refs = allocator.refs

    def hashes(self, req: Request, count: int) -> list[bytes]:
        """The chained hashes of `req`'s first `count` full pages (their tokens known on the host)."""
        hashes, size = req.page_hashes, self.page_size
        while len(hashes) < count:
            i = len(hashes)
            hashes.append(self.allocator.page_hash(hashes[-1] if hashes else None,
                                                   req.token_slice(i * size, (i + 1) * size)))
        return hashes[:count]

    def _matchable(self, req: Request) -> list[bytes]:
        """The hashes of `req`'s full pages a match may cover: at most its tokens - 1 (one is always computed)."""
        return self.hashes(req, (req.num_tokens - 1) // self.page_size)

    def match(self, req: Request) -> list[int]:
        return self.allocator.match(self._matchable(req))

    def host_match(self, req: Request, after: int) -> int:
        """How many of `req`'s full pages after its first `after` (cached ones) host memory holds, in a chain."""
        if self.host is None:
            return 0
        return self.host.count(self._matchable(req)[after:])

    def register(self, req: Request) -> None:
        """Register `req`'s full pages whose K/V are computed and whose tokens are known (none PENDING)."""
        known = req.num_tokens
        output = req.output
        while known > len(req.prompt) and output[known - len(req.prompt) - 1] == PENDING:
            known -= 1
        count = min(req.num_cached, known) // self.page_size
        count = min(count, len(req.pages))
        if count <= req.num_registered:
            return
        for page, page_hash in zip(req.pages[req.num_registered:count],
                                   self.hashes(req, count)[req.num_registered:]):
            self.allocator.register(page, page_hash)
        req.num_registered = count


def _cache_key(runner: StepRunner) -> bytes:
    """What the prefix cache's hashes start from: the model and cache configuration (pages of another model or
    cache layout never match)."""
    cache = runner.kv_cache
    model = runner.step_fn.model
    return repr((type(model).__name__, getattr(getattr(model, "config", None), "_name_or_path", None),
                 cache.page_size, str(cache.dtype), [(s.num_kv_heads, s.head_dim) for s in cache.layers])).encode()

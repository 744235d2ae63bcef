"""What runs next: the continuous-batching scheduler, a pure function of the request table and the free KV pages.

Each step is a dense batch (NanoFlow, DESIGN "Engine"): every running request's decode token first, oldest
first; then the chunks of prefills already under way; then waiting requests are admitted in arrival order
(FIFO, preempted ones at the front) while the step's token budget, the running-request limit and the free
pages allow, each admitted prompt filling the rest of the budget as a prefill chunk.

Pages: an admitted request gets pages for every token it already has (its prompt, plus what it generated
before a preemption), so its prefill chunks never need more; a decode needs a new page every `page_size`
tokens. When a decode finds no free page, the latest-admitted running request is preempted: its pages are
freed and it waits at the front of the queue, to be recomputed from its prompt plus its generated tokens.
The oldest request is never preempted for a younger one, so it always progresses: no request starves. A
step that had to preempt admits nothing (admitting would only preempt again). Admission also keeps pages
for what the running requests are expected to generate (`reserve_ratio` x their remaining `max_new_tokens`,
as SGLang estimates it; the engine lowers the ratio as requests end early at EOS) plus a small watermark, so
that admitted requests rarely have to be preempted (each preemption recomputes a whole prefill).

Prefix caching (`prefix`, a `PrefixView`): an admitted request whose first full pages are cached (at most
its tokens - 1, so at least one is computed) shares them and its chunk starts past them; admission counts a
shared page only if no request holds it yet (a cached, unreferenced page is counted among the free pages,
and taking it uses one), so pages shared with running requests cost nothing. A preempted request frees only
the pages no other request holds. Where its chain goes on in host memory (`prefix_offload_gib`), the pages
after are copied back into its first new pages while this step runs, and its chunk runs from the next step
(as a prefill under way).

    schedule(running, waiting, free_pages, limits, prefix) -> StepPlan(chunks, admitted, preempted, new_pages,
                                                                       hits)

`schedule` reads requests and changes nothing; the engine applies the plan (frees and grants pages, assigns
slots) and runs its chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nanoflow_fx.runtime.batch import Chunk
from nanoflow_fx.runtime.requests import Request

__all__ = ["PrefixView", "SchedulerLimits", "StepPlan", "schedule", "RESERVE_CAP"]

RESERVE_CAP = 4096  # new tokens per request that admission reserves pages for, at most


@dataclass(frozen=True)
class SchedulerLimits:
    """What bounds one step: tokens (`max_num_tokens`), running requests (`max_running`: the step runner's
    slots), the page size, and what admission keeps free: `watermark_pages`, plus pages for `reserve_ratio` of
    every admitted request's remaining new tokens (0: none; 1: all of them, so nothing is ever preempted unless
    the estimate is exceeded)."""

    max_num_tokens: int
    max_running: int
    page_size: int
    watermark_pages: int = 0
    reserve_ratio: float = 0.0

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def expected_pages(self, req: Request) -> int:
        """Pages `req` is expected to hold at its end: its tokens plus `reserve_ratio` of those still to come
        (at most `RESERVE_CAP` of them, as SGLang clips it: an unbounded request would reserve the cache)."""
        remaining = min(max(req.max_new_tokens - len(req.output), 0), RESERVE_CAP)
        return self.pages_for(req.num_tokens + int(self.reserve_ratio * remaining))


class PrefixView(Protocol):
    """What the scheduler reads of the prefix cache (reading changes nothing)."""

    def match(self, req: Request) -> Sequence[int]:
        """The cached pages `req` may share: its longest chain of cached full pages, at most its tokens - 1."""
        ...

    def refs(self, page: int) -> int:
        """How many requests hold `page`."""
        ...

    def host_match(self, req: Request, after: int) -> int:
        """How many of `req`'s full pages after its first `after` host memory holds (`prefix_offload_gib`)."""
        ...


@dataclass(frozen=True)
class StepPlan:
    """The next step: its chunks (decode tokens first), and the table changes to apply before running it."""

    chunks: tuple[Chunk, ...]
    admitted: tuple[Request, ...]  # waiting -> running, in admission order
    preempted: tuple[Request, ...]  # running -> front of the waiting queue (pages freed)
    new_pages: tuple[tuple[Request, int], ...]  # pages each request must gain before the step runs
    hits: tuple[tuple[Request, tuple[int, ...]], ...] = ()  # cached pages admitted requests share (then new ones)
    # of an admitted request's new pages, how many come from host memory (its chunk runs from the next step)
    loads: tuple[tuple[Request, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def schedule(running: Sequence[Request], waiting: Sequence[Request], free_pages: int,
             limits: SchedulerLimits, prefix: PrefixView | None = None) -> StepPlan:
    """Plan the next step. `running` in admission order, `waiting` in queue order (front first); `prefix`: the
    prefix cache, if on."""
    plan = _Planner(list(running), free_pages, limits, prefix)
    plan.decodes()
    plan.prefills()
    if not plan.preempted:
        plan.admit(waiting)
    # One-token chunks lead the step: the attention backend runs them on its decode kernel (batch.build_step).
    chunks = sorted(plan.chunks, key=lambda c: c.num_tokens > 1)
    return StepPlan(tuple(chunks), tuple(plan.admitted), tuple(plan.preempted),
                    tuple((r, n) for r, n in plan.grants.items() if n > 0), tuple(plan.hits), tuple(plan.loads))


class _Planner:
    """The mutable working state of one `schedule` call (never the requests themselves)."""

    def __init__(self, running: list[Request], free_pages: int, limits: SchedulerLimits,
                 prefix: PrefixView | None) -> None:
        self.running, self.free, self.limits, self.prefix = running, free_pages, limits, prefix
        self.budget = limits.max_num_tokens
        self.chunks: list[Chunk] = []
        self.admitted: list[Request] = []
        self.preempted: list[Request] = []
        self.gone: set[Request] = set()  # the preempted, for O(1) membership on the per-step path
        self.grants: dict[Request, int] = {}
        self.hits: list[tuple[Request, tuple[int, ...]]] = []
        self.loads: list[tuple[Request, int]] = []
        self.taken: dict[int, int] = {}  # (prefix caching) references this plan adds (+) or drops (-) per page

    def _missing_pages(self, req: Request, num_tokens: int) -> int:
        held = len(req.pages) + self.grants.get(req, 0)
        return max(0, self.limits.pages_for(req.num_cached + num_tokens) - held)

    def decodes(self) -> None:
        for req in list(self.running):  # oldest first; preemption removes from the end
            if self.budget == 0:
                return
            if req.num_pending != 1 or req in self.gone:
                continue
            if self._make_room(req):
                self.chunks.append(Chunk(req, 1))
                self.budget -= 1

    def _make_room(self, req: Request) -> bool:
        """Grant `req` the page its decode needs, preempting the latest-admitted requests while pages lack.
        Returns False if `req` itself had to go."""
        need = self._missing_pages(req, 1)
        while need > self.free:
            victim = self.running[-1]
            self.running.pop()
            self.preempted.append(victim)
            self.gone.add(victim)
            self.free += self._freed(victim.pages) + self.grants.pop(victim, 0)
            if victim is req:
                return False
        self.grants[req] = self.grants.get(req, 0) + need
        self.free -= need
        return True

    def _freed(self, pages: Sequence[int]) -> int:
        """Pages that dropping one reference to each of `pages` frees (shared ones stay held)."""
        if self.prefix is None:
            return len(pages)
        freed = 0
        for page in pages:
            refs = self.prefix.refs(page) + self.taken.get(page, 0)
            self.taken[page] = self.taken.get(page, 0) - 1
            freed += refs == 1
        return freed

    def _shared_cost(self, hits: Sequence[int]) -> int:
        """Free pages that sharing `hits` uses: those no request holds (cached, unreferenced) or takes yet."""
        assert self.prefix is not None
        return sum(1 for page in hits if self.prefix.refs(page) + self.taken.get(page, 0) == 0)

    def prefills(self) -> None:
        for req in self.running:
            if self.budget == 0:
                return
            if req.num_pending > 1:
                n = min(req.num_pending, self.budget)
                self.chunks.append(Chunk(req, n))
                self.budget -= n

    def admit(self, waiting: Sequence[Request]) -> None:
        limits = self.limits
        if not waiting:  # (the decode-only steady state: no pass over the running requests)
            return
        reserved = 0
        if limits.reserve_ratio > 0:
            reserved = sum(max(limits.expected_pages(r) - len(r.pages) - self.grants.get(r, 0), 0)
                           for r in self.running)
        for req in waiting:  # FIFO: the queue's head blocks the requests behind it
            if self.budget == 0 or len(self.running) + len(self.admitted) >= limits.max_running:
                return
            if not req.resolved:  # a preempted request waits until its last sampled tokens are read back
                return
            pages = limits.pages_for(req.num_tokens)
            hits = tuple(self.prefix.match(req)) if self.prefix is not None else ()
            cost = pages - len(hits) + (self._shared_cost(hits) if hits else 0)  # (shared pages counted once)
            growth = max(limits.expected_pages(req) - pages, 0) if limits.reserve_ratio > 0 else 0
            keep = limits.watermark_pages + reserved + growth
            if cost + keep > self.free and (self.running or self.admitted or cost > self.free):
                return
            reserved += growth
            self.grants[req] = pages - len(hits)
            self.free -= cost
            self.admitted.append(req)
            # a waiting request caches nothing but what it shares, and what host memory gives back to its first
            # new pages: those are copied in under this step, and the request's chunk runs from the next one
            loads = self.prefix.host_match(req, len(hits)) if self.prefix is not None else 0
            if hits:
                self.hits.append((req, hits))
                for page in hits:
                    self.taken[page] = self.taken.get(page, 0) + 1
            if loads:
                self.loads.append((req, loads))
                continue
            start = len(hits) * limits.page_size
            n = min(req.num_tokens - start, self.budget)
            self.chunks.append(Chunk(req, n, start))
            self.budget -= n

"""The scheduler is a pure function of the request table and the free pages: its plans keep every rule of
dense batching (decode tokens first, the token budget, the running limit, FIFO admission, preemption of the
latest-admitted request only, pages for every chunk), and the engine driven by it finishes every request (no
starvation, no page leak), however small the cache."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow_fx.runtime import Engine, Request, SchedulerLimits, schedule
from nanoflow_fx.runtime.requests import FINISHED, RUNNING
from tests.echo_runner import EchoRunner
from tests.helpers import DEFAULT_CONFIG
from tests.steps import GREEDY


def _request(i: int, prompt_len: int, max_new: int) -> Request:
    return Request(f"r{i}", [3] * prompt_len, GREEDY, max_new, arrival=i)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Request], list[Request], int, SchedulerLimits]:
    """A running set in some state of prefill/decode, a waiting queue, and the free pages."""
    page = draw(st.sampled_from([1, 2, 4, 16]))
    limits = SchedulerLimits(max_num_tokens=draw(st.integers(1, 64)), max_running=draw(st.integers(1, 8)),
                             page_size=page, watermark_pages=draw(st.integers(0, 2)))
    running = []
    for i in range(draw(st.integers(0, limits.max_running))):
        req = _request(i, draw(st.integers(1, 40)), 64)
        generated = draw(st.integers(0, 10))
        req.output = [5] * generated
        req.num_cached = req.num_tokens - 1 if generated else draw(st.integers(0, len(req.prompt) - 1))
        held = limits.pages_for(req.num_cached + (1 if generated else len(req.prompt) - req.num_cached))
        req.pages = list(range(held))  # ids do not matter to the scheduler, only counts
        req.state, req.admitted = RUNNING, i
        running.append(req)
    waiting = [_request(100 + i, draw(st.integers(1, 40)), 8) for i in range(draw(st.integers(0, 5)))]
    return running, waiting, draw(st.integers(0, 20)), limits


@settings(max_examples=300, deadline=None)
@given(tables())
def test_plans_keep_the_rules_of_dense_batching(table: tuple) -> None:  # type: ignore[type-arg]
    running, waiting, free, limits = table
    plan = schedule(running, waiting, free, limits)
    sizes = [c.num_tokens for c in plan.chunks]
    assert sum(sizes) <= limits.max_num_tokens
    assert sizes == sorted(sizes, key=lambda n: n > 1), "one-token chunks lead the step"
    assert len({id(c.request) for c in plan.chunks}) == len(plan.chunks), "one chunk per request"
    # Preemption takes the latest-admitted requests only, and a step that preempts admits nothing.
    assert list(plan.preempted) == running[len(running) - len(plan.preempted):][::-1]
    assert not (plan.preempted and plan.admitted)
    # FIFO: the admitted requests are the head of the queue.
    assert list(plan.admitted) == waiting[: len(plan.admitted)]
    kept = len(running) - len(plan.preempted)
    assert kept + len(plan.admitted) <= limits.max_running
    # Pages: the grants fit in what was free plus what preemption freed, and cover every chunk.
    grants = dict(plan.new_pages)
    freed = sum(len(r.pages) for r in plan.preempted)
    assert sum(grants.values()) <= free + freed
    for chunk in plan.chunks:
        req = chunk.request
        assert req not in plan.preempted
        assert limits.pages_for(chunk.start + chunk.num_tokens) <= len(req.pages) + grants.get(req, 0)
        assert chunk.start == req.num_cached and chunk.num_tokens <= req.num_pending
    # Every running decode that was not preempted gets its token while the budget lasts.
    decodes = [r for r in running if r.num_pending == 1 and r not in plan.preempted]
    scheduled = {id(c.request) for c in plan.chunks}
    if len(decodes) <= limits.max_num_tokens:
        assert all(id(r) in scheduled for r in decodes)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[tuple[int, int, int]], SchedulerLimits, int]:
    """Requests (arrival step, prompt length, new tokens), the limits, and a cache size that fits the largest."""
    page = draw(st.sampled_from([1, 2, 4, 8]))
    requests = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 30), st.integers(1, 12)), min_size=1,
                             max_size=10))
    limits = SchedulerLimits(max_num_tokens=draw(st.integers(4, 48)), max_running=draw(st.integers(1, 6)),
                             page_size=page, watermark_pages=draw(st.integers(0, 1)))
    largest = max(limits.pages_for(p + n) for _, p, n in requests)
    return requests, limits, largest + draw(st.integers(0, 12))


@pytest.mark.parametrize("prefix_caching", [False, True])
@settings(max_examples=200, deadline=None)
@given(workload=workloads())
def test_the_engine_finishes_every_request_without_leaking_pages(workload: tuple,  # type: ignore[type-arg]
                                                                  prefix_caching: bool) -> None:
    """The real engine driven by the scheduler, on the echo model (tests/echo_runner.py) with tokens read back at
    once: every request finishes with all its tokens, in a bounded number of steps, however often it is preempted;
    pages are conserved throughout (with prefix caching, whose equal prompts share pages: every page held by as
    many requests as its count says, or free, or cached and unheld)."""
    specs, limits, num_pages = workload
    runner = EchoRunner(num_pages, limits.page_size, limits.max_running)
    config = dataclasses.replace(DEFAULT_CONFIG, max_num_tokens=limits.max_num_tokens,
                                 max_batch_size=limits.max_running, prefix_caching=prefix_caching)
    engine = Engine(runner, config, reserve_ratio=0.0)  # type: ignore[arg-type]
    engine.limits = limits  # with its watermark (the engine's own keeps 1% of the pages)
    arrivals = sorted((t, i, p, n) for i, (t, p, n) in enumerate(specs))
    requests: list[Request] = []
    for step in range(2000):
        while arrivals and arrivals[0][0] <= step:
            _, i, p, n = arrivals.pop(0)
            requests.append(engine.add_request([3] * p, GREEDY, n))
        if not (arrivals or engine.has_work):
            break
        engine.step()
        allocator = engine.kv_cache.allocator
        allocator.check([r.pages for r in engine.running])
        if not prefix_caching:
            held = sum(len(r.pages) for r in engine.running)
            assert held + allocator.num_free == num_pages, "pages leaked or double-counted"
        assert all(limits.pages_for(r.num_cached) <= len(r.pages) for r in engine.running)
    done = [r for r in requests if r.state == FINISHED]
    assert len(done) == len(specs), f"unfinished after 2000 steps ({engine.stats.preemptions} preemptions)"
    assert all(len(r.output) == r.max_new_tokens for r in done)
    allocator.check([])
    assert allocator.num_free == num_pages
    if not prefix_caching:
        assert sorted(allocator._free) == list(range(num_pages))


def test_a_full_cache_preempts_the_latest_admitted_request() -> None:
    """Two decoding requests, each needing a new page, one free page: the older one gets it, the younger is
    preempted (its pages freed, to be recomputed later)."""
    limits = SchedulerLimits(max_num_tokens=16, max_running=4, page_size=4)
    old, young = _request(0, 8, 8), _request(1, 8, 8)
    for rank, req in enumerate((old, young)):
        req.output, req.num_cached, req.pages, req.state, req.admitted = [5], 8, [2 * rank, 2 * rank + 1], RUNNING, rank
    plan = schedule([old, young], [], 0, limits)  # both at 9 tokens: a third page each, none free
    assert plan.preempted == (young,)
    assert [c.request for c in plan.chunks] == [old] and dict(plan.new_pages) == {old: 1}

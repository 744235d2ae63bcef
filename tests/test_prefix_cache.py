"""Prefix caching (`NanoFlowConfig.prefix_caching`): requests share the KV pages of identical leading full pages.

The allocator's table (reference counts, the hash chain, the LRU list of cached unreferenced pages) on its own;
the scheduler's page counting with sharing; and the engine on the echo model (tests/echo_runner.py: a page shared
wrongly, written while shared or evicted while in use changes the tokens), whose every request must still get
what it would alone, with the table balanced after every step, over random streams of requests that share
prefixes (whole pages, parts of pages, a previous request's prompt and output: a conversation's next round),
with eviction and preemption; then a real tiny model against HF.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from nanoflow_fx.errors import KVCacheExhaustedError
from nanoflow_fx.runtime import Engine, Request, SchedulerLimits, schedule
from nanoflow_fx.runtime.kv_cache import HostPages, PageAllocator, _runs, page_bytes
from tests.echo_runner import EchoRunner, echo_continuation, late_readbacks
from tests.helpers import DEFAULT_CONFIG, NO_EOS, PAD, assert_nothing_held, hf_greedy, optimized, reference
from tests.steps import GREEDY
from tests.test_engine import Spec, _assert_served_as_alone, _engine, _expected, _serve
from tests.tiny_models import VOCAB


# ------------------------------------------------------------------------------------------ the allocator
def _chain(allocator: PageAllocator, pages: list[list[int]]) -> list[bytes]:
    hashes: list[bytes] = []
    for tokens in pages:
        hashes.append(allocator.page_hash(hashes[-1] if hashes else None, tokens))
    return hashes


def test_the_allocator_shares_counts_and_evicts_least_recent_tail_first() -> None:
    alloc = PageAllocator(6, key=b"k")
    a = alloc.allocate(3)
    chain = _chain(alloc, [[1, 2], [3, 4], [5, 6]])
    for page, h in zip(a, chain):
        alloc.register(page, h)
    assert alloc.match(chain) == a and alloc.match(_chain(alloc, [[1, 2], [3, 9]])) == a[:1]
    assert alloc.match(_chain(alloc, [[9, 2], [3, 4]])) == []  # the chain: a page is only found after its parent
    assert alloc.match(_chain(PageAllocator(1, key=b"other"), [[1, 2]])) == []  # another model's key
    b = a[:2]
    alloc.acquire(b)  # a second holder
    assert [alloc.refs(p) for p in a] == [2, 2, 1]
    alloc.check([a, b])
    alloc.free(a)  # the first holder ends: its last page is cached, unreferenced, and counts as free
    assert alloc.num_free == 4 and [alloc.refs(p) for p in a] == [1, 1, 0]
    alloc.check([b])
    alloc.free(b)  # (tail first: the chain's second page goes on the LRU list before its first)
    alloc.check([])
    assert alloc.num_free == 6 and alloc.num_cached == 3
    fresh = alloc.allocate(3)  # never-cached pages first
    assert sorted(fresh) == [3, 4, 5] and alloc.match(chain) == a
    evicting = alloc.allocate(2)  # then the least recently freed cached pages: the tail of the chain first
    assert evicting == [a[2], a[1]] and alloc.match(chain) == a[:1]
    alloc.check([fresh, evicting])
    with pytest.raises(KVCacheExhaustedError, match="needs 2 pages but only 1 of 6 are free"):
        alloc.allocate(2)
    alloc.free(fresh + evicting)
    with pytest.raises(RuntimeError, match="freed more often"):
        alloc.free([fresh[0]])


def test_a_hash_cached_once_keeps_its_first_page() -> None:
    alloc = PageAllocator(2)
    h = alloc.page_hash(None, [7, 7])
    first, second = alloc.allocate(1), alloc.allocate(1)
    alloc.register(first[0], h)
    alloc.register(second[0], h)  # the same tokens computed twice (admitted in one step): the first stays
    assert alloc.match([h]) == first
    alloc.free(first + second)
    assert alloc.num_cached == 1
    alloc.check([])


# ------------------------------------------------------------------------------------------ the scheduler
class _View:
    def __init__(self, hits: dict[str, list[int]], refs: dict[int, int]) -> None:
        self.hits, self._refs = hits, refs

    def match(self, req: Request) -> list[int]:
        return self.hits.get(req.request_id, [])

    def refs(self, page: int) -> int:
        return self._refs.get(page, 0)

    def host_match(self, req: Request, after: int) -> int:
        return self.host.get(req.request_id, 0) if hasattr(self, "host") else 0


def test_admission_counts_a_shared_page_once() -> None:
    """Two waiting requests of 3 pages share 2 cached pages: one held by a running request (free to share), one
    unreferenced (it uses a free page once, for both). Each chunk starts after the shared pages."""
    limits = SchedulerLimits(max_num_tokens=64, max_running=4, page_size=4)
    running = Request("run", [3] * 8, GREEDY, 8, output=[5], pages=[0, 1, 2], num_cached=8, state="running")
    a, b = Request("a", [3] * 12, GREEDY, 1), Request("b", [3] * 11, GREEDY, 1)
    view = _View({"a": [0, 4], "b": [0, 4]}, {0: 1, 1: 1, 2: 1})
    plan = schedule([running], [a, b], 3, limits, view)  # 1 (page 4) + 1 new for a + 1 new for b
    assert plan.admitted == (a, b)
    assert plan.hits == ((a, (0, 4)), (b, (0, 4)))
    assert dict(plan.new_pages) == {a: 1, b: 1}
    assert [(c.request.request_id, c.start, c.num_tokens, c.completes) for c in plan.chunks] == [
        ("run", 8, 1, True), ("a", 8, 4, True), ("b", 8, 3, True)]
    plan = schedule([running], [a, b], 2, limits, view)  # b's new page does not fit
    assert plan.admitted == (a,)


def test_a_request_whose_pages_come_from_host_memory_runs_from_the_next_step() -> None:
    """Request a shares 1 cached page and host memory holds its next 2: the plan admits it, grants its pages and
    loads 2 of them, but gives it no chunk (the copies run under this step); b, behind it, is admitted and runs.
    Next step, a (its pages in place) is a prefill under way: its chunk starts after the loaded pages."""
    limits = SchedulerLimits(max_num_tokens=64, max_running=4, page_size=4)
    a, b = Request("a", [3] * 14, GREEDY, 1), Request("b", [3] * 6, GREEDY, 1)
    view = _View({"a": [0]}, {0: 1})
    view.host = {"a": 2}  # type: ignore[attr-defined]
    plan = schedule([], [a, b], 8, limits, view)
    assert plan.admitted == (a, b) and plan.loads == ((a, 2),) and dict(plan.new_pages) == {a: 3, b: 2}
    assert [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("b", 0, 6)]
    a.pages, a.num_cached, a.state = [0, 5, 6, 7], 12, "running"  # (the engine: shared, granted, loaded)
    plan = schedule([a], [], 4, limits, view)
    assert [(c.request.request_id, c.start, c.num_tokens, c.completes) for c in plan.chunks] == [("a", 12, 2, True)]


def test_preempting_a_request_frees_only_its_unshared_pages() -> None:
    """Two decodes need a page each and none is free: the youngest request goes, but of its 3 pages only its own
    one is freed (2 are shared with the oldest), so the second decode's request must go too."""
    limits = SchedulerLimits(max_num_tokens=64, max_running=4, page_size=2)

    def running(rid: str, pages: list[int], admitted: int) -> Request:
        return Request(rid, [3] * 4, GREEDY, 8, output=[5, 5, 5], pages=pages, num_cached=6, state="running",
                       admitted=admitted)

    old, mid, young = running("old", [0, 1, 2], 0), running("mid", [4, 5, 6], 1), running("young", [0, 1, 3], 2)
    view = _View({}, {0: 2, 1: 2, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
    plan = schedule([old, mid, young], [], 0, limits, view)
    assert plan.preempted == (young, mid) and dict(plan.new_pages) == {old: 1}
    # (without sharing, the same young request would have freed 3 pages: enough for both decodes)
    plan = schedule([old, mid, young], [], 0, limits, _View({}, {p: 1 for p in range(7)}))
    assert plan.preempted == (young,) and dict(plan.new_pages) == {old: 1, mid: 1}


# ------------------------------------------------------------------------------------------ the engine
def _caching_engine(num_pages: int, page_size: int, budget: int, max_running: int,
                    reserve_ratio: float | None = None, host_pages: int = 0) -> Engine:
    runner = EchoRunner(num_pages, page_size, max_running)
    cache = runner.kv_cache
    offload = host_pages * page_bytes(cache.layers, page_size, cache.dtype) / 2**30  # GiB that hold `host_pages`
    config = dataclasses.replace(DEFAULT_CONFIG, max_num_tokens=budget, max_batch_size=max_running,
                                 prefix_caching=True, prefix_offload_gib=offload)
    engine = Engine(runner, config, reserve_ratio)  # type: ignore[arg-type]
    assert (engine.host_pages.num_pages if engine.host_pages else 0) == host_pages
    return engine


def _run(engine: Engine, specs: list[Spec], polls: list[int] | None = None) -> None:
    """Serve `specs` (each request checked against the echo model alone, the table after every step) and check
    that everything balances at the end."""
    expected = _expected(specs, echo_continuation)
    with late_readbacks(polls or [0]):
        served = _serve(engine, specs, [eos for eos, _ in expected])
    _assert_served_as_alone(served, expected, specs)
    assert_nothing_held(engine)
    engine.kv_cache.allocator.check([])


SYSTEM = tuple(range(10, 22))  # 12 tokens: 3 pages of 4


def test_requests_sharing_a_system_prompt_skip_its_pages() -> None:
    """The first request computes the shared 3 pages; the three that arrive after it share them (and the last,
    arriving while the others run, shares pages held by running requests)."""
    specs = [Spec(SYSTEM + (40 + i, 41 + i), 6, arrive=3 * i) for i in range(4)]
    engine = _caching_engine(num_pages=40, page_size=4, budget=16, max_running=4)
    _run(engine, specs)
    assert engine.stats.prefix_hit_tokens == 3 * 12
    assert engine.stats.prefix_lookup_tokens == 4 * 14
    assert engine.stats.prefix_hit_rate == pytest.approx(36 / 56)
    assert engine.stats.prefill_tokens == 14 + 3 * 2


def test_only_full_pages_are_shared_and_one_token_is_always_computed() -> None:
    """A prefix of 1.5 pages shares one page; a prompt equal to a cached one of exactly 2 pages shares only the
    first (its last token is computed, for its logits)."""
    specs = [Spec((5, 6, 7, 8, 9, 10, 50), 3), Spec((5, 6, 7, 8, 9, 10, 60, 61), 3, arrive=5)]
    engine = _caching_engine(num_pages=20, page_size=4, budget=16, max_running=2)
    _run(engine, specs)
    assert engine.stats.prefix_hit_tokens == 4
    again = [Spec((5, 6, 7, 8, 9, 10, 11, 12), 3), Spec((5, 6, 7, 8, 9, 10, 11, 12), 3, arrive=5)]
    engine = _caching_engine(num_pages=20, page_size=4, budget=16, max_running=2)
    _run(engine, again)
    assert engine.stats.prefix_hit_tokens == 4


def test_a_next_round_shares_the_previous_rounds_output_pages() -> None:
    """A conversation's second round (the first's prompt and output plus a new turn) shares the pages of both."""
    first = (7, 8, 9, 10, 11)
    history = first + echo_continuation(first, 8)  # 13 tokens: 3 full pages of 4
    engine = _caching_engine(num_pages=20, page_size=4, budget=16, max_running=2)
    _run(engine, [Spec(first, 8), Spec(history + (30, 31), 4, arrive=20)])
    assert engine.stats.prefix_hit_tokens == 12


def test_eviction_reuses_cached_pages_and_changes_no_token() -> None:
    """A cache of 8 pages and distinct prompts of 3-4 pages each, one after another: cached pages are evicted for
    new requests (least recent first); a repeat of the first prompt after its pages were evicted recomputes them,
    a repeat of the last one shares them."""
    prompts = [tuple(range(10 * i + 3, 10 * i + 13)) for i in range(5)]
    specs = [Spec(p, 4, arrive=8 * i) for i, p in enumerate(prompts)]
    last_round = prompts[4] + echo_continuation(prompts[4], 2) + (91,)  # 13 tokens: may share 3 pages
    specs += [Spec(prompts[0] + (90,), 4, arrive=60), Spec(last_round, 4, arrive=60)]
    engine = _caching_engine(num_pages=8, page_size=4, budget=16, max_running=1)
    _run(engine, specs)
    assert engine.stats.prefix_hit_tokens == 12  # the last prompt's 3 pages (prompt + output); the first's evicted


def test_evicted_pages_come_back_from_host_memory() -> None:
    """As above, with host memory for every evicted page: the first prompt's pages, evicted from the cache, were
    copied to the host, and its repeat gets them copied back instead of computing them (the echo model's tokens
    would change if a page came back wrong or to the wrong place)."""
    prompts = [tuple(range(10 * i + 3, 10 * i + 13)) for i in range(5)]
    specs = [Spec(p, 4, arrive=8 * i) for i, p in enumerate(prompts)]
    last_round = prompts[4] + echo_continuation(prompts[4], 2) + (91,)
    specs += [Spec(prompts[0] + (90,), 4, arrive=60), Spec(last_round, 4, arrive=60)]
    engine = _caching_engine(num_pages=8, page_size=4, budget=16, max_running=1, host_pages=16)
    _run(engine, specs)
    host = engine.host_pages
    assert host is not None and host.saved > 0 and host.num_used == host.saved
    assert engine.stats.prefix_host_hit_tokens == 8 == 4 * host.loaded  # the first prompt's 2 full pages
    assert engine.stats.prefix_hit_tokens == 12 + 8


def test_host_pages_keep_the_least_recently_used_and_never_drop_what_a_plan_loads() -> None:
    device = [torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)]  # 6 "pages" of one layer
    host = HostPages(device, 2)
    host.save(0, b"a")
    host.save(1, b"b")
    host.save(0, b"a")  # already kept: it becomes the most recent
    host.save(2, b"c")  # full: "b", the least recent, goes
    assert host.count([b"a", b"c"]) == 2 and host.count([b"b", b"a"]) == 0 and host.num_used == 2
    host.hold([b"a", b"c"])
    host.save(3, b"d")  # everything kept is held: the evicted page is not kept
    assert host.count([b"d"]) == 0 and host.saved == 3
    host.flush()  # (the engine's order: a step's saves go out, then its loads come in)
    host.load([b"c", b"a"], [5, 4])
    assert torch.equal(device[0][5], torch.tensor([4.0, 5.0])) and torch.equal(device[0][4], torch.tensor([0.0, 1.0]))
    host.save(3, b"d")  # no longer held: "c" (least recently loaded) goes
    assert host.count([b"c"]) == 0 and host.count([b"a"]) == host.count([b"d"]) == 1


def test_host_pages_copy_runs_of_consecutive_pages_and_slots_as_one() -> None:
    """Saves are copied at `flush`, and consecutive pages into consecutive slots go as one copy per layer; every
    page lands where it belongs either way."""
    device = [torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2), -torch.arange(8 * 2.0).reshape(8, 2)]
    host = HostPages(device, 4)
    for page, name in ((2, b"a"), (3, b"b"), (4, b"c"), (0, b"d")):
        host.save(page, name)
    assert host.data[0].shape == (4, 2) and host.saved == 4
    host.data[0].zero_(), host.data[1].zero_()
    assert _runs([(2, 0), (3, 1), (4, 2), (0, 3)]) == [(2, 0, 3), (0, 3, 1)]
    assert _runs([(4, 0), (5, 2), (6, 3), (6, 1)]) == [(4, 0, 1), (5, 2, 2), (6, 1, 1)]
    host.flush()
    expected = [d[[2, 3, 4, 0]] for d in device]
    assert all(torch.equal(h, e) for h, e in zip(host.data, expected))
    for d in device:
        d.zero_()
    host.load([b"a", b"b", b"c", b"d"], [4, 5, 6, 1])
    assert all(torch.equal(d[[4, 5, 6, 1]], e) for d, e in zip(device, expected))
    assert host.loaded == 4


def test_a_preempted_request_recomputes_from_its_cached_pages() -> None:
    """Reserving nothing on a tiny cache, requests are preempted; their recomputation hits their own pages."""
    gen = torch.Generator().manual_seed(3)
    specs = [Spec(tuple(torch.randint(3, VOCAB, (n,), generator=gen).tolist()), 14) for n in (9, 12, 6, 11)]
    engine = _caching_engine(num_pages=12, page_size=4, budget=32, max_running=4, reserve_ratio=0.0)
    _run(engine, specs, polls=[2, 0, 1])
    assert engine.stats.preemptions > 0 and engine.stats.prefix_hit_tokens > 0


@st.composite
def shared_workloads(draw: st.DrawFn) -> dict[str, Any]:
    """Requests whose prompts start with one of a few prefixes (any length: whole pages or not), some of them a
    previous prompt plus its echo continuation (a next round), on caches small enough to evict and preempt."""
    page_size = draw(st.sampled_from([1, 2, 4]))
    tokens = st.integers(3, draw(st.sampled_from([4, 6, VOCAB - 1])))  # small alphabets: many equal pages
    bases = [tuple(draw(st.lists(tokens, max_size=14))) for _ in range(draw(st.integers(1, 3)))]
    specs: list[Spec] = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.sampled_from(bases)) + tuple(draw(st.lists(tokens, max_size=6)))
        if specs and draw(st.booleans()):  # a next round of an earlier request
            earlier = draw(st.sampled_from(specs))
            prompt = earlier.prompt + echo_continuation(earlier.prompt, earlier.max_new) + prompt[-2:]
        prompt = prompt or (3,)
        specs.append(Spec(prompt[:40], draw(st.integers(1, 10)), draw(st.integers(0, 12)),
                          draw(st.none() | st.integers(0, 6)), draw(st.booleans())))
    largest = max(-(-(len(s.prompt) + s.max_new) // page_size) for s in specs)
    return dict(page_size=page_size, specs=specs, budget=draw(st.integers(2, 48)),
                max_running=draw(st.integers(1, 6)), reserve_ratio=draw(st.sampled_from([None, 0.0, 0.5])),
                num_pages=largest + draw(st.integers(0, 2 * largest)),
                polls=draw(st.lists(st.integers(0, 3), min_size=1, max_size=6)),
                host_pages=draw(st.sampled_from([0, 0, 1, 3, 12])))


@st.composite
def offloading_workloads(draw: st.DrawFn) -> dict[str, Any]:
    """Shared workloads one request at a time, arriving apart, on a cache that holds little more than the largest,
    with host memory for a few pages: cached pages are evicted to the host and later requests find them there."""
    work = draw(shared_workloads())
    specs = [dataclasses.replace(s, arrive=12 * i) for i, s in enumerate(work["specs"])]
    largest = max(-(-(len(s.prompt) + s.max_new) // work["page_size"]) for s in specs)
    return dict(work, specs=specs, max_running=1, num_pages=largest + draw(st.integers(0, 2)),
                host_pages=draw(st.integers(1, 2 * largest)))


@settings(max_examples=200, deadline=None)
@given(work=shared_workloads() | offloading_workloads())
def test_every_request_gets_what_it_would_alone_with_prefix_caching(work: dict[str, Any]) -> None:
    """Random streams of requests sharing prefixes: the echo model's tokens of each request alone (what the engine
    gives without caching: test_engine), shared pages full, computed and never written, reference counts equal to
    the holders after every step, every page back at the end; with host memory for evicted pages (none, some) too."""
    engine = _caching_engine(work["num_pages"], work["page_size"], work["budget"], work["max_running"],
                             work["reserve_ratio"], work["host_pages"])
    _run(engine, work["specs"], work["polls"])


# ------------------------------------------------------------------------------------------ a real model
def test_a_real_model_with_prefix_caching_equals_hf_per_request() -> None:
    """A tiny llama: requests sharing a 2.5-page system prompt arrive over time on a small cache (sharing,
    chunked prefills after shared pages, eviction, preemption); each one's tokens equal HF eager generate()."""
    gen = torch.Generator().manual_seed(7)
    system = tuple(torch.randint(3, VOCAB, (10,), generator=gen).tolist())
    tails = [tuple(torch.randint(3, VOCAB, (n,), generator=gen).tolist()) for n in (3, 5, 2, 6, 4)]
    specs = [Spec(system + t, 8, arrive) for t, arrive in zip(tails, (0, 2, 3, 6, 9))]
    engine = _engine("llama", num_pages=14, page_size=4, budget=12, max_running=4, reserve_ratio=0.0)
    engine.config = dataclasses.replace(engine.config, prefix_caching=True)
    engine = Engine(engine.runner, engine.config, 0.0)
    expected = _expected(specs, lambda p, n, eos: hf_greedy("llama", p, n, eos))
    with late_readbacks([2, 0, 1]):
        served = _serve(engine, specs, [eos for eos, _ in expected])
    _assert_served_as_alone(served, expected, specs)
    assert engine.stats.prefix_hit_tokens >= 8
    assert_nothing_held(engine)
    engine.kv_cache.allocator.check([])



def test_generate_generate_batch_and_the_manager_use_prefix_caching() -> None:
    """`optimize(..., NanoFlowConfig(prefix_caching=True))`: generate(), generate_batch and the manager all hit the
    pages earlier calls left cached, and every output equals HF's."""
    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, prefix_caching=True))
    engine = model.nanoflow.engine
    gen = torch.Generator().manual_seed(13)
    system = torch.randint(3, VOCAB, (9,), generator=gen).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 6, 2)]
    eos = model.generation_config.eos_token_id

    out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False)
    assert tuple(out[0, len(prompts[0]):].tolist()) == hf_greedy("llama", tuple(prompts[0]), 5, eos)
    hits = engine.stats.prefix_hit_tokens

    results = model.generate_batch(prompts[1:], max_new_tokens=5)  # the system prompt's 2 pages, cached above
    for prompt, result in zip(prompts[1:], results.values()):
        assert tuple(result.generated_tokens) == hf_greedy("llama", tuple(prompt), 5, eos)
    assert engine.stats.prefix_hit_tokens >= hits + 2 * 8
    hits = engine.stats.prefix_hit_tokens

    manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=5, eos_token_id=VOCAB + 1))
    manager.start()
    try:
        rid = manager.add_request(prompts[2])
        result = manager.get_result(rid, timeout=60)
    finally:
        manager.stop(block=True)
    assert result is not None and tuple(result.generated_tokens) == hf_greedy("llama", tuple(prompts[2]), 5)
    assert engine.stats.prefix_hit_tokens >= hits + 8
    allocator = model.nanoflow.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages
    allocator.check([])


@pytest.mark.cuda
def test_prefix_caching_on_cuda_with_graphs_equals_hf() -> None:
    """On CUDA (Triton attention, CUDA graphs, fp32): requests sharing a system prompt, run after one that cached
    it, skip its pages, and each one's tokens equal HF eager generate() of it alone on the same device."""
    config = dataclasses.replace(DEFAULT_CONFIG, attention_backend="triton", cuda_graphs=True, prefix_caching=True)
    model = optimized("llama", config, device="cuda")
    engine = model.nanoflow.engine
    gen = torch.Generator().manual_seed(17)
    system = torch.randint(3, VOCAB, (13,), generator=gen).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (2, 5, 1, 7)]
    eos = model.generation_config.eos_token_id
    want = {}
    for i, prompt in enumerate(prompts):
        out = reference("llama", device="cuda").generate(torch.tensor([prompt], device="cuda"), max_new_tokens=10,
                                                         do_sample=False, eos_token_id=NO_EOS if eos is None else eos,
                                                         pad_token_id=PAD)
        new = out[0, len(prompt):].tolist()
        want[i] = new[: new.index(eos) + 1] if eos is not None and eos in new else new
    model.generate_batch(prompts[:1], max_new_tokens=10)
    hits = engine.stats.prefix_hit_tokens
    results = model.generate_batch(prompts, max_new_tokens=10)
    for i, result in enumerate(results.values()):
        assert list(result.generated_tokens) == want[i], f"request {i}"
    assert engine.stats.prefix_hit_tokens >= hits + 4 * 12  # each request shares the system prompt's 3 pages
    allocator = model.nanoflow.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages
    allocator.check([])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_pages_offloaded_to_host_memory_come_back_token_exact(device: str) -> None:
    """A 24-page cache (fp32; on CUDA with Triton attention and CUDA graphs, the copies on the copy stream): a
    prompt's pages are evicted by three others and copied to host memory; its follow-up gets them copied back
    under a step and computes only what follows; every request's tokens equal HF eager generate() of it alone."""
    graphs = device == "cuda"
    config = dataclasses.replace(DEFAULT_CONFIG, num_pages=24, prefix_caching=True, prefix_offload_gib=0.01,
                                 cuda_graphs=graphs, **({"attention_backend": "triton"} if graphs else {}))
    model = optimized("llama", config, device=device)
    engine = model.nanoflow.engine
    gen = torch.Generator().manual_seed(23)
    first = torch.randint(3, VOCAB, (30,), generator=gen).tolist()
    others = [torch.randint(3, VOCAB, (30,), generator=gen).tolist() for _ in range(3)]
    follow_up = first + torch.randint(3, VOCAB, (5,), generator=gen).tolist()
    host_hits = engine.stats.prefix_host_hit_tokens
    for prompt in [first, *others, follow_up]:
        result = next(iter(model.generate_batch([prompt], max_new_tokens=8).values()))
        ref = reference("llama", device=device).generate(torch.tensor([prompt], device=device), max_new_tokens=8,
                                                         do_sample=False, eos_token_id=NO_EOS, pad_token_id=PAD)
        assert list(result.generated_tokens) == ref[0, len(prompt):].tolist()
    assert engine.stats.prefix_host_hit_tokens - host_hits == 7 * 4  # the first prompt's 7 full pages
    assert engine.host_pages is not None and engine.host_pages.loaded >= 7
    allocator = model.nanoflow.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages
    allocator.check([])

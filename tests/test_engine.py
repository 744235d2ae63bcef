"""The continuous-batching engine.

Its bookkeeping, on the echo model (tests/echo_runner.py: each next token is a hash of the request's context as
its KV pages hold it, so a request's output alone is known without running the engine): whatever the arrival
order, lengths, EOS, page size, cache size (preemption), step budget, running limit and readback latency, every
request gets the tokens it would get alone, admission is FIFO, pages and slots balance after every step and all
come back, and listeners hear only tokens of the final output, in order, then the end (once).

On real models (fp32, CPU): the captured step under the engine gives each request HF eager `generate()`'s tokens
of that request alone; errors stay with their request and leak nothing; transformers' `generate_batch` and
manager contracts hold."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig
from transformers.generation.continuous_batching import RequestStatus

import nanoflow_fx
from nanoflow_fx.runtime import Chunk, Engine, Request, StepRunner
from nanoflow_fx.runtime.requests import FINISHED, PENDING
from tests.echo_runner import ChunkRecord, EchoRunner, echo_continuation, late_readbacks, next_token
from tests.helpers import (
    CORE_FAMILIES,
    DEFAULT_CONFIG,
    NO_EOS,
    PAD,
    assert_nothing_held,
    fresh,
    greedy,
    hf_greedy,
    left_padded_batch,
    optimized,
    reference,
)
from tests.tiny_models import VOCAB, build


@dataclasses.dataclass
class Spec:
    """One request of a workload: added at step `arrive`; `eos_at`: stop at the token its free run has there."""

    prompt: tuple[int, ...]
    max_new: int
    arrive: int = 0
    eos_at: int | None = None
    streaming: bool = False


@dataclasses.dataclass
class Served:
    """What serving a workload showed: the requests (in spec order), the order they were first admitted, and
    what each request's listener heard (the tokens read back so far, and whether it had ended)."""

    requests: list[Request]
    admitted: list[Request]
    heard: list[list[tuple[list[int], bool]]]
    preempted_unresolved: int  # steps that ended with a preempted request waiting for its tokens to be read back


def _expected(specs: Sequence[Spec], alone: Any) -> list[tuple[int | None, tuple[int, ...]]]:
    """(EOS, tokens) of each request run alone; `alone(prompt, max_new, eos)` generates them."""
    expected = []
    for spec in specs:
        eos = None
        if spec.eos_at is not None:  # an EOS this request really samples (at that step of its free run)
            free_run = alone(spec.prompt, spec.max_new, None)
            eos = free_run[min(spec.eos_at, len(free_run) - 1)]
        expected.append((eos, alone(spec.prompt, spec.max_new, eos)))
    return expected


def _assert_table_balances(engine: Engine) -> None:
    """Running requests hold distinct pages and slots, waiting ones none, and the rest are free. With prefix
    caching, pages are shared only if full, registered and computed (below every holder's `num_cached`: nobody
    writes them), and the reference counts equal the holders."""
    allocator, num_slots = engine.kv_cache.allocator, engine.runner.num_slots
    held = [page for r in engine.running for page in r.pages]
    allocator.check([r.pages for r in engine.running])
    if engine.prefix is None:  # (the allocator's free list itself: a page freed twice shows there)
        assert sorted(held + allocator._free) == list(range(allocator.num_pages)), "pages leaked or shared"
    else:
        shared = {page for page in held if allocator.refs(page) > 1}
        assert shared <= set(allocator._hash_of), "a shared page is not a registered (full) page"
        for r in engine.running:
            assert all(r.num_cached >= (i + 1) * engine.kv_cache.page_size
                       for i, page in enumerate(r.pages) if page in shared), "a shared page is still written"
    assert sorted([r.slot for r in engine.running] + engine.free_slots) == list(range(num_slots)), "slots"
    assert len(engine.running) <= num_slots
    assert all(not r.pages and r.slot == -1 for r in engine.waiting)


def _serve(engine: Engine, specs: Sequence[Spec], eos: Sequence[int | None]) -> Served:
    """Add each request at its arrival step and step the engine until all have ended, checking the table after
    every step."""
    arrivals = sorted(range(len(specs)), key=lambda i: specs[i].arrive)
    requests: dict[int, Request] = {}
    heard: list[list[tuple[list[int], bool]]] = [[] for _ in specs]
    admitted: list[Request] = []
    step = preempted_unresolved = 0
    while len(requests) < len(specs) or engine.has_work:
        for i in arrivals:
            if i not in requests and specs[i].arrive <= step:
                def listener(req: Request, out: list[tuple[list[int], bool]] = heard[i]) -> None:
                    out.append(([t for t in req.output if t != PENDING], req.finished))

                requests[i] = engine.add_request(specs[i].prompt, greedy(eos[i]), specs[i].max_new,
                                                 streaming=specs[i].streaming, listener=listener)
        engine.step()
        step += 1
        assert step < 2000
        _assert_table_balances(engine)
        new = [r for r in requests.values() if r.first_scheduled_time >= 0 and r not in admitted]
        admitted += sorted(new, key=lambda r: r.admitted)
        preempted_unresolved += any(r.num_preemptions and not r.resolved for r in engine.waiting)
    return Served([requests[i] for i in range(len(specs))], admitted, heard, preempted_unresolved)


def _assert_served_as_alone(served: Served, expected: Sequence[tuple[int | None, tuple[int, ...]]],
                            specs: Sequence[Spec]) -> None:
    by_arrival = sorted(served.requests, key=lambda r: r.arrival)
    assert served.admitted == by_arrival, "first admissions out of arrival order (FIFO)"
    for i, (req, (_, want), spec) in enumerate(zip(served.requests, expected, specs)):
        assert req.state == FINISHED and req.error is None, f"request {i}: {req.state} {req.error}"
        assert tuple(req.output) == want, f"request {i}"
        heard = served.heard[i]
        ends = [ended for _, ended in heard].count(True)
        updates, end = heard[: len(heard) - ends], heard[len(heard) - ends :]
        assert ends == 1 and not any(ended for _, ended in updates), f"request {i}: one end, last"
        if spec.streaming:  # every token as it is read back, one at a time, the last one with the end
            assert [tokens for tokens, _ in updates + end[:1]] == [list(want[:n]) for n in range(1, len(want) + 1)]
            assert all(tokens == list(want) for tokens, _ in end)
        else:
            assert heard == [(list(want), True)], f"request {i}: a request that does not stream hears only its end"


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    specs = [Spec(tuple(draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20))),
                  draw(st.integers(1, 12)), draw(st.integers(0, 8)), draw(st.none() | st.integers(0, 6)),
                  draw(st.booleans()))
             for _ in range(draw(st.integers(1, 8)))]
    largest = max(-(-(len(s.prompt) + s.max_new) // page_size) for s in specs)
    return dict(page_size=page_size, specs=specs, budget=draw(st.integers(2, 48)),
                max_running=draw(st.integers(1, 6)), reserve_ratio=draw(st.sampled_from([None, 0.0, 0.5])),
                num_pages=largest + draw(st.integers(0, 2 * largest)),  # small caches force preemption
                polls=draw(st.lists(st.integers(0, 3), min_size=1, max_size=6)))  # readback latencies


def _echo_engine(work: dict[str, Any]) -> Engine:
    runner = EchoRunner(work["num_pages"], work["page_size"], work["max_running"])
    config = dataclasses.replace(DEFAULT_CONFIG, max_num_tokens=work["budget"], max_batch_size=work["max_running"])
    return Engine(runner, config, work["reserve_ratio"])  # type: ignore[arg-type]


# Found by this test (kept): a request preempted before its last tokens are read back must wait for them;
# admitted again at once, it would be recomputed from a PENDING input fed from a slot it no longer holds.
_PREEMPTED_BEFORE_READBACK = dict(page_size=2, specs=[Spec((4, 47), 2, 3), Spec((33, 95, 21, 77, 26, 30), 2, 3, 3)],
                                  budget=12, max_running=2, reserve_ratio=0.0, num_pages=4, polls=[3, 0, 1])


@settings(max_examples=300, deadline=None)
@given(work=workloads())
@example(work=_PREEMPTED_BEFORE_READBACK)
def test_every_request_gets_what_it_would_alone(work: dict[str, Any]) -> None:
    """The echo model under the engine: every request's tokens equal the echo model's continuation of that request
    alone, with every rule of the table kept along the way (see the module docstring)."""
    engine = _echo_engine(work)
    expected = _expected(work["specs"], echo_continuation)
    with late_readbacks(work["polls"]):
        served = _serve(engine, work["specs"], [eos for eos, _ in expected])
    _assert_served_as_alone(served, expected, work["specs"])
    assert_nothing_held(engine)


def _assert_every_path_reached(engine: Engine, chunks: Sequence[ChunkRecord], served: Served) -> None:
    """The workload preempted (a request too, before its last tokens were read back), cut a prompt into chunks,
    fed a PENDING token, and sampled tokens past an EOS that were dropped when it was read back (the engine had
    run ahead)."""
    assert engine.stats.preemptions > 0 and served.preempted_unresolved > 0
    assert any(c.cuts_prompt for c in chunks) and any(c.pending for c in chunks)
    assert engine.stats.generated_tokens > sum(len(r.output) for r in served.requests)


def test_the_echo_workload_reaches_every_path() -> None:
    """The property above is only as good as the paths its examples reach: a workload known to reach all."""
    specs = [Spec((5, 9, 14, 3, 7, 22, 40, 41, 8), 12, 0, 2, True), Spec((11, 12), 10, 0), Spec((30,) * 13, 9, 1),
             Spec((7, 8, 9), 6, 3, 0, True), Spec((60, 61, 62, 63, 64), 12, 4), Spec((3, 4, 5, 6), 1, 6)]
    work = dict(page_size=4, specs=specs, budget=8, max_running=4, reserve_ratio=0.0, num_pages=9, polls=[3, 0, 1])
    engine = _echo_engine(work)
    expected = _expected(specs, echo_continuation)
    with late_readbacks([3, 0, 1]):
        served = _serve(engine, specs, [eos for eos, _ in expected])
    _assert_served_as_alone(served, expected, specs)
    _assert_every_path_reached(engine, engine.runner.chunks, served)  # type: ignore[attr-defined]
    assert_nothing_held(engine)


def test_a_stream_that_stops_at_eos_hears_its_end_once() -> None:
    """A streaming request whose EOS is read back ends there, and its listener hears that end once: the manager
    publishes each call, so a second final result would be left for get_result after a handler took the first."""
    prompt = (3,)
    eos = echo_continuation(prompt, 1)[0]
    engine = _echo_engine(dict(page_size=1, budget=2, max_running=1, reserve_ratio=None, num_pages=2))
    served = _serve(engine, [Spec(prompt, 1, eos_at=0, streaming=True)], [eos])
    assert served.heard[0] == [([eos], True)]


def test_the_echo_model_reads_its_context_from_the_pages() -> None:
    """The echo model's tokens come from what the request's pages hold (a PENDING input from the slot table), so a
    page shared, freed early or written at the wrong place changes them."""
    runner = EchoRunner(num_pages=4, page_size=4, num_slots=1)
    req = Request("r", [5, 6, 7, 8, 9], greedy(), 3, slot=0)
    req.pages = runner.kv_cache.allocator.allocate(2)
    assert runner.run([Chunk(req, 5)]).argmax(-1).tolist() == [next_token([5, 6, 7, 8, 9])]
    req.num_cached, req.output = 5, [PENDING]
    runner.record_tokens([0], torch.tensor([42]))
    assert runner.run([Chunk(req, 1)]).argmax(-1).tolist() == [next_token([5, 6, 7, 8, 9, 42])]
    runner.kv_cache.caches[0][req.pages[0], 0, 1] = 77  # another request's token in this request's first page
    req.num_cached, req.output = 6, [42, 3]
    assert runner.run([Chunk(req, 1)]).argmax(-1).tolist() == [next_token([5, 77, 7, 8, 9, 42, 3])]


# ------------------------------------------------------------------------------------------ real models
def _engine(family: str, num_pages: int, page_size: int, budget: int, max_running: int,
            reserve_ratio: float | None = None) -> Engine:
    """An engine over the shared optimized model's captured step, with a cache and limits of its own."""
    runtime = optimized(family).nanoflow
    config = dataclasses.replace(runtime.config, max_num_tokens=budget, max_batch_size=max_running)
    cache = runtime.new_cache(num_pages, page_size)
    runner = StepRunner(runtime.step_fn, cache, config, runtime.attention_backend, runtime.attention_configs)
    return Engine(runner, config, reserve_ratio)


class _Recording:
    """Wraps a runner's run() to keep a record of every chunk it runs."""

    def __init__(self, run: Any) -> None:
        self.real, self.chunks = run, []

    def __call__(self, chunks: Any, *args: Any, **kwargs: Any) -> Any:
        self.chunks += [ChunkRecord.of(c) for c in chunks]
        return self.real(chunks, *args, **kwargs)


def test_a_replaced_cache_gives_its_memory_back_before_the_new_one_is_allocated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, optimize() sizes the cache from the memory left, counting the measured step's small cache as free,
    then replaces it (`replace_cache`). The small cache's pages are freed before the new cache is allocated (both
    at once did not fit an H100 holding the 70B shape's 80 layers), nothing else keeps them alive, and the model
    generates HF's tokens on the new cache."""
    import weakref

    from nanoflow_fx.runtime.kv_cache import PagedKVCache

    model = fresh("llama")
    runtime = model.nanoflow
    old = runtime.kv_cache
    pages, layers = old.allocator.num_pages, len(old.caches)
    prompt = (5, 9, 17, 4, 33, 8, 21)
    before = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=NO_EOS,
                            pad_token_id=PAD)[0, len(prompt):].tolist()
    assert tuple(before) == hf_greedy("llama", prompt, 6)
    pages_alive = [weakref.ref(c) for c in old.caches]
    del old
    alive_at_allocation = []
    allocate = PagedKVCache.__init__

    def recording_init(self: PagedKVCache, *args: Any, **kwargs: Any) -> None:
        alive_at_allocation.append(sum(ref() is not None for ref in pages_alive))
        allocate(self, *args, **kwargs)

    monkeypatch.setattr(PagedKVCache, "__init__", recording_init)
    runtime.replace_cache(pages)
    assert alive_at_allocation == [0], f"{alive_at_allocation} of {layers} layers' pages alive at the allocation"
    assert runtime.kv_cache.allocator.num_pages == pages and runtime.engine.kv_cache is runtime.kv_cache
    after = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=NO_EOS,
                           pad_token_id=PAD)[0, len(prompt):].tolist()
    assert after == before


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_engine_output_equals_hf_per_request(family: str) -> None:
    """Six requests arriving over time on a small cache with a small step budget and late readbacks: prompts are
    cut into chunks, requests are preempted and recomputed, PENDING tokens are fed on the device side, two stop at
    EOS after the engine ran ahead of them, and every request's tokens still equal HF eager generate() of it
    alone (the same checks as on the echo model)."""
    gen = torch.Generator().manual_seed(11)
    lengths, news = (9, 3, 14, 5, 7, 2), (12, 10, 9, 8, 12, 1)
    prompts = [tuple(torch.randint(3, VOCAB, (n,), generator=gen).tolist()) for n in lengths]
    specs = [Spec(p, new, arrive, eos_at) for p, new, arrive, eos_at in
             zip(prompts, news, (0, 0, 1, 3, 4, 6), (2, None, None, 0, None, None))]
    engine = _engine(family, num_pages=10, page_size=4, budget=8, max_running=4, reserve_ratio=0.0)
    recording = _Recording(engine.runner.run)
    engine.runner.run = recording  # type: ignore[method-assign]
    expected = _expected(specs, lambda p, n, eos: hf_greedy(family, p, n, eos))
    with late_readbacks([3, 0, 1]):
        served = _serve(engine, specs, [eos for eos, _ in expected])
    _assert_served_as_alone(served, expected, specs)
    _assert_every_path_reached(engine, recording.chunks, served)
    assert_nothing_held(engine)


def test_a_tiny_cache_preempts_and_changes_no_token() -> None:
    """Six requests on a cache that holds about two, admitted without reserving pages for their new tokens:
    requests are preempted (recomputed later from prompt plus generated tokens) and every output still equals
    HF's. With the default reservation the same run needs no preemption."""
    engine = _engine("llama", num_pages=12, page_size=4, budget=32, max_running=6, reserve_ratio=0.0)
    gen = torch.Generator().manual_seed(5)
    prompts = [tuple(torch.randint(3, VOCAB, (int(n),), generator=gen).tolist()) for n in (14, 9, 17, 6, 12, 10)]
    requests = [engine.add_request(p, greedy(), 16) for p in prompts]
    engine.run_until_done(requests)
    assert engine.stats.preemptions > 0
    for prompt, req in zip(prompts, requests):
        assert tuple(req.output) == hf_greedy("llama", prompt, 16)
    assert engine.kv_cache.allocator.num_free == 12
    reserving = _engine("llama", num_pages=12, page_size=4, budget=32, max_running=6)
    requests = [reserving.add_request(p, greedy(), 16) for p in prompts]
    reserving.run_until_done(requests)
    assert reserving.stats.preemptions == 0
    for prompt, req in zip(prompts, requests):
        assert tuple(req.output) == hf_greedy("llama", prompt, 16)


def test_generate_runs_more_rows_than_slots_and_equals_hf() -> None:
    """max_batch_size bounds the requests running at once, not a generate() call: 20 rows through 8 slots."""
    ids, mask = left_padded_batch([3, 12, 7, 9, 5, 11, 2, 8, 4, 10, 6, 12, 3, 9, 7, 5, 11, 4, 8, 6], seed=3)
    model = optimized("llama")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert model.nanoflow.config.max_batch_size == 8 and torch.equal(got, want)


def test_a_step_failure_fails_its_requests_and_leaks_no_page(monkeypatch: pytest.MonkeyPatch) -> None:
    model = optimized("llama")
    runner = model.nanoflow.runner
    real_run, calls = runner.run, []

    def failing_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected step failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", failing_run)
    ids, mask = left_padded_batch([5, 9, 3])
    with pytest.raises(RuntimeError, match="injected step failure"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert_nothing_held(model.nanoflow.engine)
    monkeypatch.setattr(runner, "run", real_run)
    want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)


def test_threads_calling_generate_get_their_own_tokens() -> None:
    """Concurrent generate() calls on one model become requests of its one engine: each gets its own result
    (nano-batched steps: each step's nano-batch record travels through the runtime's channel)."""
    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    batches = [left_padded_batch([3 + i, 9, 5 + i % 3], seed=10 + i) for i in range(6)]
    wants = [reference("llama").generate(ids, attention_mask=m, max_new_tokens=8, do_sample=False)
             for ids, m in batches]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            ids, mask = batches[i]
            results[i] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(wants):
        assert torch.equal(results[i], want), f"thread {i}"


def test_generate_batch_follows_transformers_contract() -> None:
    """`generate_batch(inputs, ...)` -> {request_id: GenerationOutput} in input order, FINISHED, tokens equal to
    HF's; a request that can never fit fails alone (FAILED, with the reason), the others complete."""
    model = optimized("llama")  # max_seq_len 96
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (6, 11, 4)]
    too_long = [5] * 95  # 95 + 6 new tokens > max_seq_len
    not_a_token = [5, VOCAB]
    out = model.generate_batch(prompts[:2] + [too_long] + prompts[2:] + [not_a_token], max_new_tokens=6)
    assert list(out) == ["req_0", "req_1", "req_2", "req_3", "req_4"]
    assert out["req_2"].status == RequestStatus.FAILED and "max_seq_len" in out["req_2"].error
    assert out["req_4"].status == RequestStatus.FAILED and "not a token id" in out["req_4"].error
    for rid, prompt in zip(["req_0", "req_1", "req_3"], prompts):
        result = out[rid]
        assert result.status == RequestStatus.FINISHED and result.error is None
        assert result.prompt_ids == prompt
        eos = model.generation_config.eos_token_id
        assert tuple(result.generated_tokens) == hf_greedy("llama", tuple(prompt), 6, eos)
    assert model.nanoflow.kv_cache.allocator.num_free == model.nanoflow.kv_cache.allocator.num_pages
    assert model.generate_batch([]) == {}


def test_per_request_sampling_parameters() -> None:
    """transformers' per-request keywords: a top_k=1 request is greedy while its neighbours sample freely."""
    model = optimized("llama")
    config = GenerationConfig(do_sample=True, max_new_tokens=10, eos_token_id=VOCAB + 1)
    manager = model.init_continuous_batching(config)
    manager.start()
    try:
        torch.manual_seed(0)
        prompt = [5, 9, 14, 3]
        greedy_id = manager.add_request(prompt, top_k=1)
        free = [manager.add_request(prompt, temperature=1.5) for _ in range(3)]
        results = {}
        while len(results) < 4:
            result = manager.get_result(timeout=5)
            assert result is not None
            if result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop()
    assert tuple(results[greedy_id].generated_tokens) == hf_greedy("llama", tuple(prompt), 10)
    sampled = {tuple(results[r].generated_tokens) for r in free}
    assert sampled != {tuple(results[greedy_id].generated_tokens)}  # 30 tokens of a 96-way draw: not all greedy


def test_manager_streams_cancels_and_stops() -> None:
    model = optimized("gemma2")
    manager = model.init_continuous_batching(GenerationConfig(max_new_tokens=12, eos_token_id=VOCAB + 1))
    manager.start()
    try:
        streamed = manager.add_request([7, 8, 9, 10], streaming=True)
        cancelled = manager.add_request([11, 12, 13], max_new_tokens=40)
        manager.cancel_request(cancelled)
        lengths, final = [], None
        for result in manager.request_id_iter(streamed):
            lengths.append(len(result.generated_tokens))
            final = result
    finally:
        manager.stop(block=True)
    assert final is not None and final.status == RequestStatus.FINISHED
    assert tuple(final.generated_tokens) == hf_greedy("gemma2", (7, 8, 9, 10), 12)
    assert len(lengths) > 2 and lengths == sorted(lengths)  # partial results grew to the full output
    assert not manager.is_running()
    allocator = model.nanoflow.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages  # the cancelled request's pages came back


def test_request_larger_than_the_whole_cache_is_refused_before_any_work() -> None:
    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(DEFAULT_CONFIG, num_pages=3))  # 12 tokens
    ids = torch.randint(3, 90, (2, 5))
    with pytest.raises(nanoflow_fx.KVCacheExhaustedError, match=r"13 tokens need 4 KV-cache pages.*3 pages"):
        model.generate(ids, max_new_tokens=8)
    allocator = model.nanoflow.kv_cache.allocator
    assert allocator.num_free == 3
    want = build("llama").generate(ids, max_new_tokens=4, do_sample=False)  # 9 tokens each: one at a time
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)

"""The continuous-batching engine: every request's tokens equal HF eager `generate()` of that request alone,
whatever the arrival order, lengths, EOS, page size, cache size (preemption) and step budget; errors stay with
their request and leak nothing; transformers' `generate_batch` and manager contracts hold (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig
from transformers.generation.continuous_batching import RequestStatus

import nanoflow_fx
from nanoflow_fx.runtime import Engine, StepRunner
from nanoflow_fx.runtime.sampling import SamplingParams
from tests.conftest import DEFAULT_CONFIG, optimized, reference
from tests.test_generate_parity import _left_padded_batch
from tests.tiny_models import VOCAB, build

PAD = 0


@functools.lru_cache(maxsize=4096)
def _hf_tokens(family: str, prompt: tuple[int, ...], max_new: int, eos: int | None) -> tuple[int, ...]:
    """HF eager greedy generate of one prompt alone: its new tokens, up to and including an EOS."""
    out = reference(family).generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=eos if eos is not None else VOCAB + 1, pad_token_id=PAD)
    new = out[0, len(prompt):].tolist()
    return tuple(new[: new.index(eos) + 1] if eos is not None and eos in new else new)


def _engine(family: str, num_pages: int, page_size: int, budget: int, max_running: int,
            reserve_ratio: float | None = None) -> Engine:
    """An engine over the shared optimized model's captured step, with a cache and limits of its own."""
    runtime = optimized(family).nanoflow
    config = dataclasses.replace(runtime.config, max_num_tokens=budget, max_batch_size=max_running)
    cache = nanoflow_fx.runtime.PagedKVCache(runtime.layers, num_pages, page_size, runtime.dtype, runtime.device)
    runner = StepRunner(runtime.step_fn, cache, config, runtime.attention_backend, runtime.attention_configs)
    return Engine(runner, config, reserve_ratio)


def _params(eos: int | None) -> SamplingParams:
    return SamplingParams(False, 1.0, 0, 1.0, (eos,) if eos is not None else (), 0)


@st.composite
def workloads(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    page_size = draw(st.sampled_from([1, 4, 16]))
    specs = []
    for _ in range(draw(st.integers(1, 6))):
        prompt = tuple(draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20)))
        specs.append(dict(prompt=prompt, max_new=draw(st.integers(1, 12)), arrive=draw(st.integers(0, 8)),
                          eos_at=draw(st.none() | st.integers(0, 6))))
    largest = max(-(-(len(s["prompt"]) + s["max_new"]) // page_size) for s in specs)
    return dict(page_size=page_size, specs=specs, budget=draw(st.integers(2, 48)),
                max_running=draw(st.integers(1, 6)), reserve_ratio=draw(st.sampled_from([None, 0.0, 0.5])),
                num_pages=largest + draw(st.integers(0, 2 * largest)))  # small caches force preemption


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=workloads())
def test_engine_output_equals_hf_per_request(family: str, work: dict) -> None:  # type: ignore[type-arg]
    engine = _engine(family, work["num_pages"], work["page_size"], work["budget"], work["max_running"],
                     work["reserve_ratio"])
    expected, arrivals = [], sorted(range(len(work["specs"])), key=lambda i: work["specs"][i]["arrive"])
    for spec in work["specs"]:
        eos = None
        if spec["eos_at"] is not None:  # an EOS this request really samples (at that step of its free run)
            free_run = _hf_tokens(family, spec["prompt"], spec["max_new"], None)
            eos = free_run[min(spec["eos_at"], len(free_run) - 1)]
        expected.append((eos, _hf_tokens(family, spec["prompt"], spec["max_new"], eos)))
    requests: dict[int, object] = {}
    step = 0
    while len(requests) < len(arrivals) or engine.has_work:
        for i in arrivals:
            if i not in requests and work["specs"][i]["arrive"] <= step:
                spec = work["specs"][i]
                requests[i] = engine.add_request(spec["prompt"], _params(expected[i][0]), spec["max_new"])
        engine.step()
        step += 1
        assert step < 2000
    for i, req in requests.items():
        assert req.state == "finished" and req.error is None  # type: ignore[attr-defined]
        assert tuple(req.output) == expected[i][1], f"request {i}"  # type: ignore[attr-defined]
    allocator = engine.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages and not engine.running and not engine.waiting
    assert sorted(engine.free_slots) == list(range(work["max_running"]))


def test_a_tiny_cache_preempts_and_changes_no_token() -> None:
    """Six requests on a cache that holds about two, admitted without reserving pages for their new tokens:
    requests are preempted (recomputed later from prompt plus generated tokens) and every output still equals
    HF's. With the default reservation the same run needs no preemption."""
    engine = _engine("llama", num_pages=12, page_size=4, budget=32, max_running=6, reserve_ratio=0.0)
    gen = torch.Generator().manual_seed(5)
    prompts = [tuple(torch.randint(3, VOCAB, (int(n),), generator=gen).tolist()) for n in (14, 9, 17, 6, 12, 10)]
    requests = [engine.add_request(p, _params(None), 16) for p in prompts]
    engine.run_until_done(requests)
    assert engine.stats.preemptions > 0
    for prompt, req in zip(prompts, requests):
        assert tuple(req.output) == _hf_tokens("llama", prompt, 16, None)
    assert engine.kv_cache.allocator.num_free == 12
    reserving = _engine("llama", num_pages=12, page_size=4, budget=32, max_running=6)
    requests = [reserving.add_request(p, _params(None), 16) for p in prompts]
    reserving.run_until_done(requests)
    assert reserving.stats.preemptions == 0
    for prompt, req in zip(prompts, requests):
        assert tuple(req.output) == _hf_tokens("llama", prompt, 16, None)


def test_generate_runs_more_rows_than_slots_and_equals_hf() -> None:
    """max_batch_size bounds the requests running at once, not a generate() call: 20 rows through 8 slots."""
    ids, mask = _left_padded_batch([3, 12, 7, 9, 5, 11, 2, 8, 4, 10, 6, 12, 3, 9, 7, 5, 11, 4, 8, 6], seed=3)
    model = optimized("llama")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert model.nanoflow.config.max_batch_size == 8 and torch.equal(got, want)


def test_a_step_failure_fails_its_requests_and_leaks_no_page(monkeypatch: pytest.MonkeyPatch) -> None:
    model = optimized("llama")
    runner, allocator = model.nanoflow.runner, model.nanoflow.kv_cache.allocator
    real_run, calls = runner.run, []

    def failing_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected step failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", failing_run)
    ids, mask = _left_padded_batch([5, 9, 3])
    with pytest.raises(RuntimeError, match="injected step failure"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    engine = model.nanoflow.engine
    assert allocator.num_free == allocator.num_pages and not engine.running and not engine.waiting
    assert len(engine.free_slots) == runner.num_slots
    monkeypatch.setattr(runner, "run", real_run)
    want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)


def test_threads_calling_generate_get_their_own_tokens() -> None:
    """Concurrent generate() calls on one model become requests of its one engine: each gets its own result."""
    model = optimized("qwen2", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    batches = [_left_padded_batch([3 + i, 9, 5 + i % 3], seed=10 + i) for i in range(6)]
    wants = [reference("qwen2").generate(ids, attention_mask=m, max_new_tokens=8, do_sample=False)
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
        assert tuple(result.generated_tokens) == _hf_tokens("llama", tuple(prompt), 6, eos)
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
        greedy = manager.add_request(prompt, top_k=1)
        free = [manager.add_request(prompt, temperature=1.5) for _ in range(3)]
        results = {}
        while len(results) < 4:
            result = manager.get_result(timeout=5)
            assert result is not None
            if result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop()
    assert tuple(results[greedy].generated_tokens) == _hf_tokens("llama", tuple(prompt), 10, None)
    sampled = {tuple(results[r].generated_tokens) for r in free}
    assert sampled != {tuple(results[greedy].generated_tokens)}  # 30 tokens of a 96-way draw: not all greedy


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
    assert tuple(final.generated_tokens) == _hf_tokens("gemma2", (7, 8, 9, 10), 12, None)
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

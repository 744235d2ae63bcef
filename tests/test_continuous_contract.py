"""transformers' continuous-batching contract, kept where it is awkward: options the engine lacks are refused by
name, EOS and sampling follow transformers, a bad request or an interrupted caller fails only its own requests,
streams are monotone and leave nothing behind, the manager's lifecycle never strands a caller, and malformed
inputs are refused before anything is queued (tiny fp32 models on the CPU; outputs compared with transformers'
own `generate_batch` on the reference model where they could differ)."""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

import nanoflow_fx
from tests.helpers import NO_EOS, assert_nothing_held, hf_greedy, optimized, reference
from tests.tiny_models import VOCAB

PROMPTS = [[5, 9, 14, 3], [7, 8]]
EOS_FIRST = [56, 28, 52, 74, 57, 11]  # the reference llama's first greedy token after this prompt is its EOS (2)


def _transformers_batch(inputs: list[list[int]], config: GenerationConfig, **kwargs: Any) -> dict[str, Any]:
    """transformers' own `generate_batch` on the reference llama (a small paged cache keeps it fast on the CPU)."""
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64, max_requests_per_batch=4,
                                  use_cuda_graph=False, use_async_batching=False)
    return reference("llama").generate_batch(inputs, copy.deepcopy(config), continuous_batching_config=cb, **kwargs)


def _tokens(results: dict[str, Any]) -> dict[str, list[int]]:
    return {rid: list(r.generated_tokens) for rid, r in results.items()}


def _hf_greedy(prompt: list[int], max_new: int) -> list[int]:
    return list(hf_greedy("llama", tuple(prompt), max_new))


def _finals(manager: Any, *ids: str, timeout: float = 20.0) -> dict[str, Any]:
    """The final results of the requests `ids` (read with get_result(), in the order they come), by id; an id
    still missing after `timeout` seconds is left out."""
    finals: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while set(ids) - set(finals) and (left := deadline - time.monotonic()) > 0:
        result = manager.get_result(timeout=left)
        if result is None:  # timed out, or nothing more can come
            break
        if result.is_finished():
            finals[result.request_id] = result
    return finals


def _no_leak(model: Any) -> None:
    """Every KV page and slot is free and no request is queued or running."""
    assert_nothing_held(model.nanoflow.engine)


def _in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


# ------------------------------------------------------------------------------------------- 1. options
def test_options_the_engine_lacks_are_refused_by_name() -> None:
    model = optimized("llama")
    for option, value in (("no_repeat_ngram_size", 2), ("repetition_penalty", 1.3), ("max_time", 5.0)):
        config = GenerationConfig(max_new_tokens=4, do_sample=False, **{option: value})
        with pytest.raises(ValueError, match=option):
            model.generate_batch(PROMPTS, config)
        with pytest.raises(ValueError, match=option):
            model.init_continuous_batching(config)
    _no_leak(model)


def test_suppress_tokens_equal_transformers() -> None:
    model = optimized("llama")
    plain = GenerationConfig(max_new_tokens=5, do_sample=False)
    first = model.generate_batch(PROMPTS, plain)["req_0"].generated_tokens[0]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, suppress_tokens=[first, VOCAB + 3])
    got = _tokens(model.generate_batch(PROMPTS, config))
    assert first not in got["req_0"]
    assert got == _tokens(_transformers_batch(PROMPTS, config))


def test_num_return_sequences_follow_transformers_ids_and_order() -> None:
    model = optimized("llama")
    config = GenerationConfig(max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2)
    got = model.generate_batch(PROMPTS, config)
    want = _transformers_batch(PROMPTS, config)
    assert list(got) == list(want) == ["req_0__child#0", "req_0", "req_1__child#0", "req_1"]
    assert _tokens(got) == _tokens(want)
    manager = model.init_continuous_batching(config)
    manager.start()
    try:
        rid = manager.add_request(PROMPTS[0], request_id="mine")
        results = _finals(manager, f"{rid}__child#0", rid)
    finally:
        manager.stop(block=True, timeout=20)
    assert [r.generated_tokens for r in results.values()] == [want["req_0"].generated_tokens] * 2
    _no_leak(model)


# ---------------------------------------------------------------------------------------------- 2. EOS
def test_a_config_without_eos_disables_eos_like_transformers() -> None:
    model = optimized("llama")
    config = GenerationConfig(max_new_tokens=6, do_sample=False)  # eos_token_id None; the model's EOS is 2
    got = _tokens(model.generate_batch([EOS_FIRST], config))
    assert got == _tokens(_transformers_batch([EOS_FIRST], config))
    assert got["req_0"][0] == 2 and len(got["req_0"]) == 6  # ran through the model's EOS
    manager = model.init_continuous_batching(config)
    manager.start()
    try:
        result = _finals(manager, rid := manager.add_request(EOS_FIRST))[rid]
    finally:
        manager.stop(block=True, timeout=20)
    assert result.generated_tokens == got["req_0"]
    assert config.eos_token_id is None  # the caller's config is left as it was


# ------------------------------------------------------------------------------------ 3. bad sampling values
@pytest.mark.parametrize("bad, named", [
    (dict(temperature=0.0), "temperature=0.0"), (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_k=-1), "top_k=-1"), (dict(top_p=-0.5), "top_p=-0.5"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k="abc"), "top_k='abc'"),
])
def test_a_bad_sampling_value_fails_only_its_request(bad: dict[str, Any], named: str) -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=True, max_new_tokens=30, eos_token_id=NO_EOS))
    manager.start()
    try:
        good = manager.add_request([5, 9, 14, 3], top_k=1)
        rid = manager.add_request([7, 8, 9], **bad)
        finals = _finals(manager, rid, good)
        alive = manager.is_running()
    finally:
        manager.stop(block=True, timeout=20)
    failed, result = finals[rid], finals[good]
    assert failed.status == RequestStatus.FAILED and named in failed.error
    key = next(iter(bad))
    assert ("0 and 1" if key == "top_p" else ">= 0" if key == "top_k" else "> 0") in failed.error  # the range
    assert result.status == RequestStatus.FINISHED and result.generated_tokens == _hf_greedy([5, 9, 14, 3], 30)
    assert alive
    _no_leak(model)


def test_an_eos_outside_the_vocabulary_with_min_new_tokens_runs_like_hf() -> None:
    """HF's min-new-tokens mask ignores ids outside the vocabulary (`isin`); it used to fail the step."""
    model = optimized("llama")
    config = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=3)
    manager = model.init_continuous_batching(config)
    manager.start()
    try:
        rid = manager.add_request([5, 9, 14, 3], eos_token_id=[2, VOCAB + 7])
        result = _finals(manager, rid)[rid]
    finally:
        manager.stop(block=True, timeout=20)
    want = reference("llama").generate(torch.tensor([[5, 9, 14, 3]]), max_new_tokens=8, min_new_tokens=3,
                                       do_sample=False, eos_token_id=[2, VOCAB + 7], pad_token_id=0)[0, 4:].tolist()
    assert result.status == RequestStatus.FINISHED and result.generated_tokens == want
    _no_leak(model)


def test_a_sampling_failure_in_a_step_fails_only_that_parameter_group() -> None:
    """temperature=1e-45 passes every range check but its probabilities are NaN: multinomial raises in the step."""
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=True, max_new_tokens=12, eos_token_id=NO_EOS))
    try:
        good = manager.add_request([5, 9, 14, 3], top_k=1)
        bad = manager.add_request([7, 8, 9, 10], temperature=1e-45)
        manager.start()  # both are admitted in the same first step
        finals = _finals(manager, bad, good)
        alive = manager.is_running()
    finally:
        manager.stop(block=True, timeout=20)
    failed, result = finals[bad], finals[good]
    assert failed.status == RequestStatus.FAILED and "probability" in failed.error
    assert result.status == RequestStatus.FINISHED and result.generated_tokens == _hf_greedy([5, 9, 14, 3], 12)
    assert alive
    _no_leak(model)


# ------------------------------------------------------------------------------------------ 4. interrupts
def test_an_interrupted_generate_batch_cancels_only_its_own_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (SIGINT to the main thread) while generate_batch and another caller's request share a step."""
    model = optimized("llama")
    runner = model.nanoflow.runner
    real_run, sent = runner.run, threading.Event()

    def run(chunks: Any, *args: Any, **kwargs: Any) -> Any:
        ids = {c.request.request_id for c in chunks}
        if "other" in ids and len(ids) > 1 and not sent.is_set():
            sent.set()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
        return real_run(chunks, *args, **kwargs)

    monkeypatch.setattr(runner, "run", run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=80, eos_token_id=NO_EOS))
    manager.start()
    try:
        manager.add_request([5, 9, 14, 3], request_id="other")
        with pytest.raises(KeyboardInterrupt):
            model.generate_batch([[7, 8, 9], [10, 11]], max_new_tokens=40)
        result = _finals(manager, "other")["other"]
    finally:
        signal.signal(signal.SIGINT, previous)
        manager.stop(block=True, timeout=20)
    assert sent.is_set()
    assert result.status == RequestStatus.FINISHED, result.error
    assert result.generated_tokens == _hf_greedy([5, 9, 14, 3], 80)
    _no_leak(model)


# ----------------------------------------------------------------------------------------------- 5. streams
def test_a_stream_is_monotone_and_nothing_is_left_behind() -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=NO_EOS))
    manager.start()
    rid = manager.add_request([5, 9, 14, 3], streaming=True)
    manager.stop(block=True, timeout=20)  # flush: every update is delivered, none read yet
    assert manager.get_result(request_id="someone-else", timeout=0) is None  # another consumer looks first
    assert manager.get_result(request_id="someone-else", timeout=0) is None
    stream = []
    while (result := manager.get_result(request_id=rid, timeout=0)) is not None:
        stream.append(result)
    lengths = [len(r.generated_tokens) for r in stream]
    assert lengths and lengths == sorted(set(lengths)) and stream[-1].is_finished()  # grows, ends at the end
    assert stream[-1].generated_tokens == _hf_greedy([5, 9, 14, 3], 6)
    assert manager.get_result(timeout=0) is None  # no stale partial result left


def test_a_cancelled_stream_leaves_nothing_behind() -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=80, eos_token_id=NO_EOS))
    manager.start()
    try:
        rid = manager.add_request([5, 9, 14, 3], streaming=True)
        first = manager.get_result(request_id=rid, timeout=20)
        manager.cancel_request(rid)
        iterating, stream = _in_thread(lambda: list(manager.request_id_iter(rid)))
        iterating.join(timeout=5)  # ends: the request is gone
        assert not iterating.is_alive()
    finally:
        manager.stop(block=True, timeout=20)
    assert first is not None and not first.is_finished()
    assert stream == [[]] and manager.get_result(timeout=0) is None
    _no_leak(model)


def test_register_result_handler_delivers_each_update_on_the_event_loop() -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=NO_EOS))
    manager.start()

    async def stream() -> list[Any]:
        got: list[Any] = []
        done = asyncio.Event()

        def on_result(result: Any) -> None:
            got.append(result)
            if result.is_finished():
                done.set()

        rid = manager.add_request([5, 9, 14, 3], streaming=True)
        manager.register_result_handler(rid, on_result)
        await asyncio.wait_for(done.wait(), timeout=20)
        return got

    try:
        got = asyncio.run(stream())
    finally:
        manager.stop(block=True, timeout=20)
    lengths = [len(r.generated_tokens) for r in got]
    assert lengths == sorted(set(lengths)) and got[-1].generated_tokens == _hf_greedy([5, 9, 14, 3], 6)
    assert manager.get_result(timeout=0) is None  # none went to get_result


# --------------------------------------------------------------------------------------------- 6. lifecycle
def test_get_result_on_a_stopped_manager_returns_none_and_hard_stop_wakes_a_waiting_consumer() -> None:
    model = optimized("llama")
    config = GenerationConfig(do_sample=False, max_new_tokens=80, eos_token_id=NO_EOS)
    manager = model.init_continuous_batching(config)
    manager.start()
    waiting, got = _in_thread(manager.get_result)  # nothing will come until the stop
    manager.stop(hard_stop=True, block=True, timeout=20)
    waiting.join(timeout=5)
    assert not waiting.is_alive() and got == [None]
    after, got_after = _in_thread(manager.get_result)  # a stopped manager answers at once (transformers: None)
    after.join(timeout=5)
    assert not after.is_alive() and got_after == [None]
    busy = model.init_continuous_batching(config)
    busy.start()
    rid = busy.add_request([5, 9, 14, 3])
    busy.stop(hard_stop=True, block=True, timeout=20)
    result = busy.get_result(timeout=5)  # as transformers: a hard stop fails what was left
    assert result is not None and result.request_id == rid and result.status == RequestStatus.FAILED
    assert "stop" in result.error
    _no_leak(model)


def test_add_request_after_stop_is_refused_like_transformers() -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=NO_EOS))
    manager.start()
    manager.stop(block=True, timeout=20)
    assert manager.add_request([5, 9, 14, 3]) is None  # transformers: a warning and no id
    _no_leak(model)


def test_request_ids_never_collide() -> None:
    model = optimized("llama")
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, max_new_tokens=30, eos_token_id=NO_EOS))
    manager.start()
    try:
        explicit = manager.add_request([5, 9, 14, 3], request_id="req_0")
        with pytest.raises(ValueError, match="'req_0'.*already"):
            manager.add_request([7, 8], request_id="req_0")
        auto = [manager.add_request([7, 8]) for _ in range(2)]
        results = _finals(manager, explicit, *auto)
    finally:
        manager.stop(block=True, timeout=20)
    assert explicit == "req_0" and "req_0" not in auto and len(set(auto)) == 2
    assert results["req_0"].generated_tokens == _hf_greedy([5, 9, 14, 3], 30)
    assert all(results[rid].generated_tokens == _hf_greedy([7, 8], 30) for rid in auto)
    _no_leak(model)


# ------------------------------------------------------------------------------------------------ 7. inputs
@pytest.mark.parametrize("bad, named", [
    (None, r"inputs\[1\]"), ("5 6", r"inputs\[1\].*str"), ([[5, 6]], r"inputs\[1\]"),
    (torch.tensor([[5, 6]]), r"inputs\[1\].*2-D"), ([5.7, 6], r"inputs\[1\].*5.7"), ([True, 6], r"inputs\[1\].*True"),
    (torch.tensor([5.0, 6.0]), r"inputs\[1\].*float"),
])
def test_malformed_inputs_are_refused_before_anything_is_queued(bad: Any, named: str) -> None:
    model = optimized("llama")
    with pytest.raises(nanoflow_fx.InvalidInputError, match=named):
        model.generate_batch([[5, 9, 14, 3], bad], max_new_tokens=4)
    _no_leak(model)  # the good first entry was not queued either


def test_integer_arrays_and_tensors_are_token_ids() -> None:
    model = optimized("llama")
    want = _tokens(model.generate_batch([[5, 9, 14, 3]], max_new_tokens=4))["req_0"]
    inputs = [np.array([5, 9, 14, 3]), torch.tensor([5, 9, 14, 3]), [np.int64(5), 9, 14, torch.tensor(3).item()]]
    assert list(_tokens(model.generate_batch(inputs, max_new_tokens=4)).values()) == [want] * 3


# ---------------------------------------------------------------------------------------------- 8. messages
def test_errors_name_the_value_and_the_fix() -> None:
    model = optimized("llama")  # max_seq_len 96
    out = model.generate_batch([[5] * 100], GenerationConfig(do_sample=False, eos_token_id=NO_EOS))
    error = out["req_0"].error
    assert "prompt of 100 tokens" in error and "max_seq_len=96" in error and "too long" in error
    manager = model.init_continuous_batching(GenerationConfig(do_sample=True, max_new_tokens=4))
    manager.start()
    try:
        rid = manager.add_request([5, 6], top_k="abc")
        failed = _finals(manager, rid)[rid]
    finally:
        manager.stop(block=True, timeout=20)
    assert "top_k='abc'" in failed.error and "invalid literal" not in failed.error


def test_generation_config_fields_as_keywords_and_fractional_max_new_tokens() -> None:
    model = optimized("llama")
    torch.manual_seed(0)
    sampled = model.generate_batch(PROMPTS, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=NO_EOS)
    assert all(r.status == RequestStatus.FINISHED for r in sampled.values())
    assert _tokens(sampled)["req_0"] == _hf_greedy(PROMPTS[0], 6)
    with pytest.raises(ValueError, match="not_an_option"):
        model.generate_batch(PROMPTS, max_new_tokens=6, not_an_option=3)
    ids = torch.tensor([PROMPTS[0]])
    want = model.generate(ids, max_new_tokens=2.5, do_sample=False)[0, 4:].tolist()  # type: ignore[arg-type]
    got = model.generate_batch(PROMPTS[:1], max_new_tokens=2.5, eos_token_id=NO_EOS)["req_0"].generated_tokens
    assert len(want) == 3 and got == want
    _no_leak(model)

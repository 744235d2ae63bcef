"""transformers' continuous-batching contract, kept where it is awkward: options the engine lacks are refused by
name, EOS and sampling follow transformers, a bad request or an interrupted caller fails only its own requests,
streams are monotone and leave nothing behind, the manager's lifecycle never strands a caller, and malformed
inputs are refused before anything is queued (tiny fp32 models on the CPU; outputs compared with transformers'
own `generate_batch` on the reference model where they could differ)."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

from tests.conftest import optimized, reference
from tests.tiny_models import VOCAB

PROMPTS = [[5, 9, 14, 3], [7, 8]]
EOS_FIRST = [56, 28, 52, 74, 57, 11]  # the reference llama's first greedy token after this prompt is its EOS (2)
NO_EOS = VOCAB + 1  # an id the model never samples


def _transformers_batch(inputs: list[list[int]], config: GenerationConfig, **kwargs: Any) -> dict[str, Any]:
    """transformers' own `generate_batch` on the reference llama (a small paged cache keeps it fast on the CPU)."""
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64, max_requests_per_batch=4,
                                  use_cuda_graph=False, use_async_batching=False)
    return reference("llama").generate_batch(inputs, copy.deepcopy(config), continuous_batching_config=cb, **kwargs)


def _tokens(results: dict[str, Any]) -> dict[str, list[int]]:
    return {rid: list(r.generated_tokens) for rid, r in results.items()}


def _hf_greedy(prompt: list[int], max_new: int) -> list[int]:
    out = reference("llama").generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                      eos_token_id=NO_EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _finals(manager: Any, *ids: str, timeout: float = 20.0) -> dict[str, Any]:
    """The final results of the requests `ids` (read with get_result(), in the order they come), by id; an id
    still missing after `timeout` seconds is left out."""
    finals: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while set(ids) - set(finals) and (left := deadline - time.monotonic()) > 0:
        result = manager.get_result(timeout=left)
        if result is not None and result.is_finished():
            finals[result.request_id] = result
    return finals


def _no_leak(model: Any) -> None:
    """Every KV page is free and no request is queued or running."""
    allocator, engine = model.nanoflow.kv_cache.allocator, model.nanoflow.engine
    assert allocator.num_free == allocator.num_pages
    assert not engine.running and not engine.waiting and not engine._inbox


def _in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


# ------------------------------------------------------------------------------------ 3. bad sampling values
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

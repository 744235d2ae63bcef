"""Running chosen chunks through an optimized model's step runner, for tests below the engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoflow_fx.runtime import Chunk, Request, StepRunner
from tests.helpers import greedy

GREEDY = greedy()


def runner_on(model: torch.nn.Module, num_pages: int, page_size: int) -> StepRunner:
    """A step runner of `model`'s captured step over a cache of its own (`num_pages` pages of `page_size`)."""
    runtime = model.nanoflow
    cache = runtime.new_cache(num_pages, page_size)
    return StepRunner(runtime.step_fn, cache, runtime.config, runtime.attention_backend, runtime.attention_configs,
                      runtime.split_policy)


def admit(runner: StepRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int = 1) -> list[Request]:
    """Requests for `prompts`, each holding pages for its prompt plus `max_new_tokens` (slots 0, 1, ...)."""
    cache = runner.kv_cache
    requests = []
    for i, prompt in enumerate(prompts):
        req = Request(f"r{i}", list(prompt), GREEDY, max_new_tokens, slot=i)
        req.pages = cache.allocator.allocate(cache.pages_for(len(prompt) + max_new_tokens))
        requests.append(req)
    return requests


def run(runner: StepRunner, chunks: Sequence[Chunk], all_logits: bool = True) -> torch.Tensor:
    """Run one step and advance its requests, as the engine does."""
    logits = runner.run(chunks, all_logits)
    for chunk in chunks:
        chunk.request.num_cached += chunk.num_tokens
    return logits


def release(runner: StepRunner, requests: Sequence[Request]) -> None:
    for req in requests:
        runner.kv_cache.allocator.free(req.pages)
        req.pages = []


def prefill_logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """All logits of one packed step over `prompts` on the model's own runner (pages returned after)."""
    return model.nanoflow.runner.run_prompts(prompts, all_logits=True)


def stream_chunks(requests: Sequence[Request], budget: int) -> list[Chunk]:
    """A static batch's next step: every decode token, then prefill chunks filling the rest of `budget` tokens."""
    active = [r for r in requests if r.num_pending > 0]
    chunks = [Chunk(r, 1) for r in active if r.num_cached >= len(r.prompt)]
    budget -= len(chunks)
    for req in active:
        if req.num_cached < len(req.prompt) and budget > 0:
            chunks.append(Chunk(req, min(req.num_pending, budget)))
            budget -= chunks[-1].num_tokens
    return chunks


def program_runners(model_or_step_fn: object) -> list:  # type: ignore[type-arg]
    """The `ProgramRunner`s of an optimized model's step function (or of the step function itself): the loaded or
    replicated step's, and each captured graph's (Dynamo may specialise a few, e.g. on one request); the first is
    what runs."""
    step_fn = getattr(getattr(model_or_step_fn, "nanoflow", None), "step_fn", model_or_step_fn)
    direct = [step_fn.direct.graph] if step_fn.direct is not None else []
    return list({id(r): r for r in [*direct, *(c.runner for c in step_fn.captures)]}.values())

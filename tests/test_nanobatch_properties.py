"""Property: splitting a step into nano-batches never changes its logits or its KV cache.

For every supported family, random request mixes (decode-only, prefill-only, mixed, chunked prefill), a random
number of nano-batches (1..8) and random boundaries (inside prefill chunks, nano-batches of one token), the
split step run by the step program (`ProgramRunner`: pieces on token slices, attention per nano-batch with its
own metadata) equals the unsplit captured step.

Bound: max abs difference <= 1e-5 in fp32 (logits and KV). Both paths run the same ops on the same rows;
only GEMM row counts differ, which can change the CPU BLAS blocking and so the rounding (~1e-7 observed on
these tiny models with logits of magnitude ~1). A wrong row, mask or page moves values by >1e-2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow_fx.runtime import Chunk, StepRunner
from nanoflow_fx.runtime.program_runner import Cut
from tests.helpers import ALL_FAMILIES, CORE_FAMILIES, DEFAULT_CONFIG, DEVICES, optimized
from tests.steps import admit, program_runners, run, runner_on
from tests.test_generate_parity import _left_padded_batch
from tests.tiny_models import VOCAB

ATOL = 1e-5
SPLIT_CONFIG = dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2)


@st.composite
def step_mixes(draw: st.DrawFn) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """(prompts, per-request chunk sizes, cut fractions). A request whose chunks are all 1 is decode-like."""
    kind = draw(st.sampled_from(["decode", "prefill", "mixed"]))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    prompts = [draw(st.lists(st.integers(3, VOCAB - 1), min_size=n, max_size=n)) for n in lengths]
    chunkings = []
    for n in lengths:
        if kind == "decode":
            sizes = [1] * n
        elif kind == "prefill":
            sizes = [n]
        else:
            sizes = []
            while sum(sizes) < n:
                sizes.append(draw(st.integers(1, n - sum(sizes))))
        chunkings.append(sizes)
    cuts = draw(st.lists(st.floats(0.01, 0.99), min_size=0, max_size=7))  # 1..8 nano-batches
    return prompts, chunkings, cuts


def _boundaries(cuts: list[float]):  # type: ignore[no-untyped-def]
    def boundaries(num_tokens: int) -> tuple[int, ...]:
        inner = sorted({min(max(int(c * num_tokens), 1), num_tokens - 1) for c in cuts if num_tokens > 1})
        return (0, *inner, num_tokens)

    return boundaries


def _runner(model: torch.nn.Module) -> StepRunner:
    return runner_on(model, num_pages=5 * 16, page_size=3)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=step_mixes())
def test_split_step_equals_unsplit_step(family: str, mix: tuple[list[list[int]], list[list[int]], list[float]]) -> None:
    prompts, chunkings, cuts = mix
    whole, split = _runner(optimized(family)), _runner(optimized(family, SPLIT_CONFIG))
    cut = _boundaries(cuts)
    ran: list[int] = []

    def policy(num_tokens: int, num_decodes: int) -> Cut:
        ran.append(len(cut(num_tokens)) - 1)
        return Cut(cut(num_tokens))

    def check(schedules: list) -> None:  # type: ignore[type-arg]
        if ran[-1] > 1:  # the program really ran the step cut where the policy said
            assert len(schedules) == 1
            assert schedules[0].split("nb").boundaries == cut(schedules[0].num_tokens)

    split.split_policy = policy
    _steps_equal(whole, split, prompts, chunkings, check)
    assert ran  # the split path really ran
    if cuts:
        assert max(ran) > 1  # every step has >= 2 tokens (padding included), so some cut lands inside it


def _steps_equal(whole: StepRunner, split: StepRunner, prompts: list[list[int]], chunkings: list[list[int]],
                 check: Callable[[list], None]) -> None:  # type: ignore[type-arg]
    """Run the same requests' chunks step by step on both runners: equal logits every step (and `check` on the
    split runner's Schedules of that step), equal KV cache at the end."""
    reqs_w, reqs_s = admit(whole, prompts, 0), admit(split, prompts, 0)
    pending = [list(c) for c in chunkings]
    while any(pending):
        sizes = [p.pop(0) if p else 0 for p in pending]
        for program in _program_runners(split):
            program.last_schedule = None
        got = run(split, [Chunk(r, n) for r, n in zip(reqs_s, sizes) if n])
        want = run(whole, [Chunk(r, n) for r, n in zip(reqs_w, sizes) if n])
        assert (got - want).abs().max().item() <= ATOL
        check([p.last_schedule for p in _program_runners(split) if p.last_schedule is not None])
    num_pages = whole.kv_cache.allocator.num_pages  # the scratch page (padding) is not compared
    for a, b in zip(whole.kv_cache.caches, split.kv_cache.caches):
        assert (a[:num_pages] - b[:num_pages]).abs().max().item() <= ATOL


def _recording(policy, cuts: list) -> Callable[[int, int], Cut]:  # type: ignore[no-untyped-def, type-arg]
    """`policy`, appending every cut it makes to `cuts`."""
    def record(tokens: int, decodes: int) -> Cut:
        cuts.append(policy(tokens, decodes))
        return cuts[-1]

    return record


def _program_runners(runner: StepRunner) -> list:  # type: ignore[type-arg]
    found = program_runners(runner.step_fn)
    assert found, "every configuration lowers its captured graphs to programs"
    return found


@pytest.mark.parametrize("device", DEVICES)
# dense, sliding window + soft-cap, MoE (the split-step property above covers every family)
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_generation_with_nanobatches_equals_unsplit(family: str, device: str) -> None:
    ids, mask = (t.to(device) for t in _left_padded_batch([3, 12, 7, 9]))
    want = optimized(family, device=device).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for count in (2, 4) if family != "llama" else (2, 3, 4):
        model = optimized(family, dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=count), device=device)
        runner, cuts = model.nanoflow.runner, []
        policy = runner.split_policy
        for program in _program_runners(runner):  # (shared with other tests' runners of this model)
            program.last_schedule = None
        runner.split_policy = _recording(policy, cuts)
        try:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        finally:
            runner.split_policy = policy
        assert torch.equal(got, want), f"{count} nano-batches"
        assert cuts and all(len(c.boundaries) - 1 == count for c in cuts)  # 4 rows + padding >= count
        schedules = [p.last_schedule for p in _program_runners(runner) if p.last_schedule]
        assert schedules and {s.split("nb").boundaries for s in schedules} <= {c.boundaries for c in cuts}


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=step_mixes(), attention=st.lists(st.floats(0.01, 0.99), min_size=1, max_size=5))
def test_uneven_split_step_equals_unsplit_step(family: str, mix: tuple[list[list[int]], list[list[int]], list[float]],
                                              attention: list[float]) -> None:
    """Attention calls cut at boundaries of their own (NanoFlow's uneven splits: e.g. attention in 4 nano-batches
    under GEMMs in 2): each attention call reads the dense nano-batches that overlap it, and the dense pieces read
    the attention outputs that overlap theirs; logits and KV equal the unsplit step's."""
    prompts, chunkings, cuts = mix
    whole, split = _runner(optimized(family)), _runner(optimized(family, SPLIT_CONFIG))
    dense, attn = _boundaries(cuts), _boundaries(attention)
    uneven: list[bool] = []

    def policy(num_tokens: int, num_decodes: int) -> Cut:
        uneven.append(dense(num_tokens) != attn(num_tokens))
        return Cut(dense(num_tokens), attention=attn(num_tokens))

    def check(schedules: list) -> None:  # type: ignore[type-arg]
        if uneven[-1]:  # the program ran the attention calls at their own boundaries
            assert len(schedules) == 1
            assert dict(schedules[0].splits)["attn"].boundaries == attn(schedules[0].num_tokens)
            assert dict(schedules[0].splits)["nb"].boundaries == dense(schedules[0].num_tokens)

    split.split_policy = policy
    _steps_equal(whole, split, prompts, chunkings, check)
    assert uneven  # the split path really ran

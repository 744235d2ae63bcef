"""Request bookkeeping used on the per-step hot path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanoflow_fx.runtime import Request
from tests.steps import GREEDY


@given(st.lists(st.integers(), max_size=8), st.lists(st.integers(), max_size=8), st.integers(0, 20),
       st.integers(0, 20))
def test_token_slice_equals_slicing_the_whole_sequence(prompt: list[int], output: list[int], start: int,
                                                       end: int) -> None:
    request = Request("r", prompt, GREEDY, 0, output=output)
    assert request.token_slice(start, end) == request.tokens[start:end]
    assert request.num_tokens == len(request.tokens)


@given(st.lists(st.tuples(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40),
                          st.sampled_from(["int32", "int64", "bool"])), min_size=1, max_size=9),
       st.integers(1, 4), st.integers(1, 6))
def test_host_staging_packs_each_field_as_its_own_tensor(fields: list[tuple[list[int], str]], depth: int,
                                                         rounds: int) -> None:
    """Every packed field reads back as what was given, in its dtype, 8-byte aligned in one buffer; a buffer is
    reused only `depth` packs later (so a step's inputs stay intact while later steps are packed)."""
    import torch

    from nanoflow_fx.runtime.batch import HostStaging

    staging = HostStaging(depth=depth, pin=False)
    typed = [([bool(v) for v in values] if kind == "bool" else values, getattr(torch, kind)) for values, kind in fields]
    kept = []
    for r in range(rounds):
        shifted = [([v if dtype == torch.bool else v // (r + 1) for v in values], dtype) for values, dtype in typed]
        views = staging.pack(shifted)
        assert len({v.untyped_storage().data_ptr() for v in views if v.numel()}) <= 1  # one buffer
        for view, (values, dtype) in zip(views, shifted):
            assert view.dtype == dtype and view.tolist() == values
            assert (view.storage_offset() * view.element_size()) % 8 == 0
        kept.append((views, shifted))
        for views_then, values_then in kept[-depth:]:  # the last `depth` packs are all still intact
            assert [v.tolist() for v in views_then] == [values for values, _ in values_then]


def test_a_staged_step_equals_the_unstaged_one() -> None:
    """build_step with the runner's staging gives the same inputs as without it, step after step (the ring's
    buffers are reused: a later step must not show an earlier one's values)."""
    import torch

    from nanoflow_fx.runtime import Chunk
    from nanoflow_fx.runtime.batch import HostStaging, StepShape, build_step

    cache = torch.zeros(1)
    staging = HostStaging(depth=2, pin=False)
    for step in range(5):
        requests = [Request(f"r{i}", list(range(3 + i + step)), GREEDY, 4, pages=[2 * i, 2 * i + 1])
                    for i in range(1 + step % 3)]
        chunks = [Chunk(r, r.num_pending) for r in requests]
        for shape in (None, StepShape(32, 32, 40, 32)):
            plain = build_step(chunks, (cache,), 8, 23, torch.device("cpu"), shape=shape)
            staged = build_step(chunks, (cache,), 8, 23, torch.device("cpu"), shape=shape, staging=staging)
            for a, b in zip(_tensors(plain), _tensors(staged)):
                assert a.dtype == b.dtype and torch.equal(a, b)
            assert plain.num_logits == staged.num_logits


def _tensors(inputs: object) -> list[object]:
    return [inputs.input_ids, inputs.position_ids, inputs.feed_slots, inputs.logits_indices,  # type: ignore[attr-defined]
            *inputs.metadata.tensors()]  # type: ignore[attr-defined]


@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 4)), min_size=1, max_size=6), st.integers(0, 3))
def test_a_replay_page_list_is_the_front_of_the_padded_one(requests: list[tuple[int, int]], extra: int) -> None:
    """A CUDA-graph replay packs the page list unpadded (`pad_pages=False`) and copies it into the front of the
    bucket's buffer: it must be the padded list's front, every other field equal, and every entry a request reads
    (kv_indptr's ranges) must lie inside it, so the buffer's stale tail is never read."""
    import torch

    from nanoflow_fx.runtime import Chunk
    from nanoflow_fx.runtime.batch import StepShape, build_step

    page_size, next_page, reqs = 4, 0, []
    for i, (prompt_len, generated) in enumerate(requests):
        req = Request(f"r{i}", list(range(prompt_len)), GREEDY, 8, output=[5] * generated)
        req.num_cached = req.num_tokens - 1 if generated else 0
        pages = -(-req.num_tokens // page_size)
        req.pages, next_page = list(range(next_page, next_page + pages)), next_page + pages
        reqs.append(req)
    chunks = [Chunk(r, r.num_pending) for r in reqs]
    tokens = sum(c.num_tokens for c in chunks) + extra
    shape = StepShape(tokens, tokens, next_page + 1 + tokens, tokens)
    padded = build_step(chunks, (torch.zeros(1),), page_size, next_page, torch.device("cpu"), shape=shape)
    replay = build_step(chunks, (torch.zeros(1),), page_size, next_page, torch.device("cpu"), shape=shape,
                        pad_pages=False)
    assert padded.metadata.kv_indices.shape[0] == shape.pages
    short = replay.metadata.kv_indices
    assert short.shape[0] < shape.pages
    assert torch.equal(padded.metadata.kv_indices[: short.shape[0]], short)
    assert int(replay.metadata.kv_indptr[-1]) <= short.shape[0]
    for a, b in zip(_tensors(padded), _tensors(replay)):
        if a is not padded.metadata.kv_indices:
            assert torch.equal(a, b)

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

"""Next-token selection with HF's own logits warpers, so sampling restricts the distribution as HF does."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanoflow_fx.errors import InvalidInputError
from nanoflow_fx.runtime.batch import to_device

__all__ = ["SamplingParams", "select_tokens", "sample_rows", "sampling_value"]

# What each sampling option may be (HF's warpers raise for the rest; top_p above 1 is refused too).
_RANGES = {"temperature": "a number > 0 (for greedy decoding set do_sample=False)",
           "top_k": "an int >= 0 (0: no top-k filtering)", "top_p": "a number between 0 and 1 (1: no top-p filtering)"}


@dataclass(frozen=True)
class SamplingParams:
    """The generation options the fast path honours (already merged with the model's defaults)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    min_new_tokens: int  # EOS is suppressed until a sequence has generated this many tokens
    suppress_tokens: tuple[int, ...] = ()  # never sampled (HF's SuppressTokensLogitsProcessor)

    def check(self) -> None:
        """Raise `InvalidInputError` naming a sampling value outside its range (`_RANGES`). Greedy decoding
        reads none of them, so only a sampling request is checked (as HF ignores them when not sampling)."""
        if not self.do_sample:
            return
        for key, ok in (("temperature", self.temperature > 0), ("top_k", self.top_k >= 0),
                        ("top_p", 0 <= self.top_p <= 1)):
            if not ok:
                raise InvalidInputError(f"{key}={getattr(self, key)!r} is out of range: {key} must be {_RANGES[key]}")

    @functools.cached_property
    def warpers(self) -> LogitsProcessorList:
        """HF's warpers in HF's order (temperature, top-k, top-p), each only when it changes something."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return warpers

    def young_on(self, young: list[bool], device: torch.device) -> torch.Tensor:
        """`young` (which rows may not end yet) on `device`; the last one is kept, since it stays the same step
        after step while a batch generates its first tokens (a pinned copy per step costs the host)."""
        cache = self.__dict__.setdefault("_young", {})  # not a field: equality and hashing ignore it
        key = tuple(young)
        if cache.get(device, ((), None))[0] != key:
            cache[device] = (key, to_device(young, torch.bool, device))
        return cache[device][1]

    def ids_on(self, field: str, device: torch.device, vocab: int) -> torch.Tensor:
        """`eos_token_ids` or `suppress_tokens` (`field`) as a tensor on `device`, made once per device: the
        per-step masks index with it (a Python list index would be copied from pageable memory, a host wait,
        every step). Ids outside the vocabulary are left out, as HF's masks (`torch.isin`) ignore them."""
        cache = self.__dict__.setdefault("_ids", {})  # not a field: equality and hashing ignore it
        key = (field, device, vocab)
        if key not in cache:
            cache[key] = to_device([i for i in getattr(self, field) if 0 <= i < vocab], torch.int64, device)
        return cache[key]


def sampling_value(key: str, value: object) -> float | int:
    """`value` of the sampling option `key` (temperature, top_k, top_p) as its type, or `InvalidInputError`
    naming it (a string or a bool is not a number; a float is not a top_k). Ranges: `SamplingParams.check`."""
    kind = numbers.Integral if key == "top_k" else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInputError(f"{key}={value!r} is not {'an int' if key == 'top_k' else 'a number'}: {key} must "
                                f"be {_RANGES[key]}")
    # (typeshed's numbers.Real, what `value` narrows to, offers int() no overload; top_k's is an Integral)
    return int(value) if key == "top_k" else float(value)  # type: ignore[call-overload]


def select_tokens(logits: torch.Tensor, num_generated: Sequence[int], params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` [N, vocab]; row i has generated `num_generated[i]` tokens so far.
    Sampling draws from `generator` (None: torch's global generator)."""
    scores = logits.float()
    vocab = scores.shape[-1]
    if params.eos_token_ids and params.min_new_tokens > 0:
        # A mask, not indices: no nonzero(), so no host sync on the per-step path.
        young = params.young_on([n < params.min_new_tokens for n in num_generated], scores.device)
        eos = params.ids_on("eos_token_ids", scores.device, vocab)
        scores[:, eos] = scores[:, eos].masked_fill(young[:, None], float("-inf"))
    if params.suppress_tokens:
        scores[:, params.ids_on("suppress_tokens", scores.device, vocab)] = float("-inf")
    if not params.do_sample:
        return scores.argmax(dim=-1)
    scores = params.warpers(None, scores)  # type: ignore[arg-type]  # HF's warpers ignore input_ids
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def sample_rows(logits: torch.Tensor, num_generated: Sequence[int], params: Sequence[SamplingParams],
                on_error: Callable[[list[int], Exception], None] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, vocab], row i with its own request's `params[i]` (rows that share
    parameters are selected together: one group in the common case of one parameter set).

    A group whose selection raises (NaN probabilities, a value HF's warpers refuse) raises, or with `on_error`
    is reported there with its rows, which get token 0, while the other groups' tokens stand."""
    first = params[0]
    if all(p is first or p == first for p in params):
        try:
            return select_tokens(logits, num_generated, first, generator)
        except Exception as err:
            if on_error is None:
                raise
            on_error(list(range(len(params))), err)
            return torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    groups: dict[SamplingParams, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p, []).append(row)
    tokens = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    for p, rows in groups.items():
        index = to_device(rows, torch.int64, logits.device)
        try:
            tokens[index] = select_tokens(logits.index_select(0, index), [num_generated[r] for r in rows], p,
                                          generator)
        except Exception as err:
            if on_error is None:
                raise
            on_error(rows, err)
    return tokens

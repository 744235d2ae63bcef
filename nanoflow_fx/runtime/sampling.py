"""Next-token selection with HF's own logits warpers, so sampling restricts the distribution as HF does."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanoflow_fx.runtime.batch import to_device

__all__ = ["SamplingParams", "select_tokens", "sample_rows"]


@dataclass(frozen=True)
class SamplingParams:
    """The generation options the fast path honours (already merged with the model's defaults)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    min_new_tokens: int  # EOS is suppressed until a sequence has generated this many tokens

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

    def eos_ids_on(self, device: torch.device) -> torch.Tensor:
        """`eos_token_ids` as a tensor on `device`, made once per device (the per-step EOS mask indexes with it;
        a Python list index would be copied from pageable memory, a host wait, every step)."""
        cache = self.__dict__.setdefault("_eos_ids", {})  # not a field: equality and hashing ignore it
        if device not in cache:
            cache[device] = to_device(list(self.eos_token_ids), torch.int64, device)
        return cache[device]


def select_tokens(logits: torch.Tensor, num_generated: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Pick one token per row of `logits` [N, vocab]; row i has generated `num_generated[i]` tokens so far."""
    scores = logits.float()
    if params.eos_token_ids and params.min_new_tokens > 0:
        # A mask, not indices: no nonzero(), so no host sync on the per-step path.
        young = to_device([n < params.min_new_tokens for n in num_generated], torch.bool, scores.device)
        eos = params.eos_ids_on(scores.device)
        scores[:, eos] = scores[:, eos].masked_fill(young[:, None], float("-inf"))
    if not params.do_sample:
        return scores.argmax(dim=-1)
    scores = params.warpers(None, scores)  # type: ignore[arg-type]  # HF's warpers ignore input_ids
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def sample_rows(logits: torch.Tensor, num_generated: Sequence[int], params: Sequence[SamplingParams]) -> torch.Tensor:
    """One token per row of `logits` [N, vocab], row i with its own request's `params[i]` (rows that share
    parameters are selected together: one group in the common case of one parameter set)."""
    first = params[0]
    if all(p is first or p == first for p in params):
        return select_tokens(logits, num_generated, first)
    groups: dict[SamplingParams, list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p, []).append(row)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for p, rows in groups.items():
        index = to_device(rows, torch.int64, logits.device)
        tokens[index] = select_tokens(logits.index_select(0, index), [num_generated[r] for r in rows], p)
    return tokens

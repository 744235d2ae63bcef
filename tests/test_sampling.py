"""Sampling: top_k=1 is greedy, a seed makes runs repeatable, and the warpers restrict the distribution as HF's."""

from __future__ import annotations

import math

import torch

from nanoflow_fx.runtime.sampling import SamplingParams, select_tokens
from tests.helpers import left_padded_batch, optimized


def _params(**overrides: object) -> SamplingParams:
    values: dict = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(), min_new_tokens=0)
    values.update(overrides)
    return SamplingParams(**values)  # type: ignore[arg-type]


def test_top_k_1_sampling_equals_greedy() -> None:
    ids, mask = left_padded_batch([5, 9, 3])
    model = optimized("llama")
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(sampled, greedy)


def test_fixed_seed_runs_are_identical_and_seeds_differ() -> None:
    ids, mask = left_padded_batch([5, 9, 3])
    model = optimized("llama")
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # 36 tokens from a 96-way distribution: equal only by a fluke


def _frequencies(logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    torch.manual_seed(0)
    rows = logits.expand(draws, -1).clone()
    tokens = select_tokens(rows, [0] * draws, params)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


def _chi_square_ok(freq: torch.Tensor, probs: torch.Tensor, draws: int) -> bool:
    """Pearson chi-square over tokens with expected count >= 5, against a generous 1e-4 false-alarm bound."""
    keep = probs * draws >= 5
    stat = float((((freq - probs) ** 2) / probs)[keep].sum() * draws)
    dof = int(keep.sum()) - 1
    return stat < dof + 6 * math.sqrt(2 * dof) + 10  # far above the 99.99% quantile for these dof


def test_temperature_top_k_top_p_follow_hf_distribution() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 40) * 2
    draws = 40_000
    cases = [
        (_params(temperature=0.5), torch.softmax(logits / 0.5, -1)),
        (_params(top_k=5), _renorm(torch.softmax(logits, -1), logits.topk(5).indices)),
        (_params(top_p=0.6), _renorm(torch.softmax(logits, -1), _nucleus(logits, 0.6))),
        (_params(temperature=2.0, top_k=10, top_p=0.9), _renorm(torch.softmax(logits / 2, -1),
                                                                _nucleus_of_topk(logits / 2, 10, 0.9))),
    ]
    for params, want in cases:
        freq = _frequencies(logits, params, draws)
        want = want.flatten().double()
        assert bool((freq[want == 0] == 0).all()), f"{params}: sampled a token the warpers exclude"
        assert _chi_square_ok(freq, want, draws), f"{params}: frequencies differ from the warped distribution"


def test_min_new_tokens_suppresses_eos_only_for_young_rows() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 3] = 50.0  # EOS would always win
    tokens = select_tokens(logits, [0, 2], _params(do_sample=False, eos_token_ids=(3,), min_new_tokens=2))
    assert int(tokens[0]) != 3 and int(tokens[1]) == 3


def _renorm(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(probs)
    out[..., keep.flatten()] = probs[..., keep.flatten()]
    return out / out.sum()


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest set of most likely tokens whose probability reaches top_p (HF keeps the token that crosses)."""
    probs, order = torch.softmax(logits.flatten(), -1).sort(descending=True)
    cum = probs.cumsum(0)
    count = int((cum < top_p).sum()) + 1
    return order[:count]


def _nucleus_of_topk(logits: torch.Tensor, k: int, top_p: float) -> torch.Tensor:
    top = logits.flatten().topk(k)
    masked = torch.full_like(logits.flatten(), float("-inf"))
    masked[top.indices] = top.values
    return _nucleus(masked, top_p)


def test_the_kept_min_new_tokens_mask_follows_the_rows() -> None:
    """The EOS mask of rows still under min_new_tokens is kept on the device while it stays the same; when the
    rows change, so does the mask (one parameter set, called step after step)."""
    from nanoflow_fx.runtime.sampling import SamplingParams, select_tokens

    params = SamplingParams(False, 1.0, 0, 1.0, eos_token_ids=(3,), min_new_tokens=2)
    logits = torch.zeros(2, 8)
    logits[:, 3], logits[:, 5] = 2.0, 1.0  # EOS first, token 5 second
    for generated, want in (([0, 5], [5, 3]), ([0, 5], [5, 3]), ([5, 0], [3, 5]), ([5, 5], [3, 3])):
        assert select_tokens(logits.clone(), generated, params).tolist() == want, generated

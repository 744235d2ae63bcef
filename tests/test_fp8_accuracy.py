"""What FP8 (linears, the KV cache, both) costs in accuracy, on a model trained on real text (tests/trained_model.py:
a tiny byte-level Llama whose next-byte distributions are peaked, unlike a random model's): perplexity and next-byte
agreement on held-out text, teacher-forced through the optimized model's step, against the plain fp32 model."""

from __future__ import annotations

import math

import pytest
import torch

import nanoflow_fx
from tests.trained_model import RECIPE, evaluate, heldout_windows, trained_llama

CONFIG = nanoflow_fx.NanoFlowConfig(max_batch_size=8, max_seq_len=2 * RECIPE.window, page_size=16, num_pages=64)


@pytest.fixture(scope="module")
def windows() -> list[list[int]]:
    return heldout_windows()


def test_the_trained_model_predicts_held_out_text(windows: list[list[int]]) -> None:
    """Trained: far below the 256 of a uniform guess and the unigram entropy of the text (e^3.1 ~ 23 per byte),
    its most likely next byte usually right and confidently so."""
    model, ids = trained_llama(), torch.tensor(windows)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert math.exp(nll) < 12
    assert logits.softmax(-1).amax(-1).mean() > 0.35
    assert (logits.argmax(-1) == ids[:, 1:]).float().mean() > 0.4


def test_the_plain_step_reproduces_the_plain_model(windows: list[list[int]]) -> None:
    """The measure itself: the optimized model without FP8 gives the plain model's perplexity and every one of its
    most likely next bytes (so what FP8 changes below is FP8's)."""
    result = evaluate(nanoflow_fx.optimize(trained_llama(), CONFIG), trained_llama(), windows)
    assert abs(result.perplexity_ratio - 1) < 1e-4 and result.agreement == 1.0


def test_fp8_linears_keep_perplexity_within_two_percent(windows: list[list[int]]) -> None:
    model = nanoflow_fx.optimize(trained_llama(), nanoflow_fx.NanoFlowConfig.from_dict(
        {**CONFIG.to_dict(), "linear_dtype": "fp8_e4m3"}))
    result = evaluate(model, trained_llama(), windows)
    assert abs(result.perplexity_ratio - 1) <= 0.02, result
    assert result.agreement >= 0.95, result
    assert result.perplexity != result.reference_perplexity  # FP8 did change the arithmetic


@pytest.mark.parametrize(("fp8", "bound"), [({"kv_cache_dtype": "fp8_e4m3"}, 0.01),
                                            ({"kv_cache_dtype": "fp8_e4m3", "linear_dtype": "fp8_e4m3"}, 0.02)])
def test_an_fp8_kv_cache_keeps_perplexity_within_one_percent_and_with_fp8_linears_two(
        windows: list[list[int]], fp8: dict[str, str], bound: float) -> None:
    """The FP8 KV cache at its default scales (1.0), alone and with FP8 linears (measured: 0.26% and 0.05% off the
    plain model's perplexity, 98% and 97.6% of next bytes agreeing)."""
    model = nanoflow_fx.optimize(trained_llama(), nanoflow_fx.NanoFlowConfig.from_dict({**CONFIG.to_dict(), **fp8}))
    assert model.nanoflow.kv_cache.quantized
    result = evaluate(model, trained_llama(), windows)
    assert abs(result.perplexity_ratio - 1) <= bound, result
    assert result.agreement >= 0.95, result
    assert result.perplexity != result.reference_perplexity

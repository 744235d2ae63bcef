"""End-to-end: greedy `generate()` of an optimized model equals HF eager `generate()` token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tests.helpers import ALL_FAMILIES, DEVICES, PAD, left_padded_batch, optimized, reference
from tests.tiny_models import VOCAB

_left_padded_batch = left_padded_batch  # (other test modules import it from here)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_single_prompt_greedy_matches_hf(family: str, device: str) -> None:
    ids = left_padded_batch([11])[0].to(device)
    got = optimized(family, device=device).generate(ids, max_new_tokens=16, do_sample=False)
    want = reference(family, device=device).generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_left_padded_batch_greedy_matches_hf(family: str, device: str) -> None:
    ids, mask = (t.to(device) for t in left_padded_batch([3, 12, 7, 9]))
    got = optimized(family, device=device).generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    want = reference(family, device=device).generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert got.shape == want.shape == (4, 12 + 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eos_stops_rows_and_pads_like_hf(family: str, device: str) -> None:
    ids, mask = (t.to(device) for t in left_padded_batch([5, 10, 8]))
    ref = reference(family, device=device)
    free_run = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[VOCAB + 1])
    eos = int(free_run[0, ids.shape[1] + 2])  # row 0 emits this token at its 3rd step, so it stops there
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[VOCAB + 1, eos],
                  pad_token_id=PAD)
    got = optimized(family, device=device).generate(ids, **kwargs)
    want = ref.generate(ids, **kwargs)
    assert torch.equal(got, want)
    new = got[:, ids.shape[1] :]
    # Non-vacuous: row 0 emitted EOS within 3 steps (its first occurrence may come earlier), stopped there,
    # and was padded afterwards while other rows went on.
    stop = int((new[0] == eos).nonzero()[0])
    assert stop <= 2
    assert bool((new[0, stop + 1 :] == PAD).all())
    assert new.shape[1] > stop + 1  # another row went on, so row 0 really was padded


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_generation_config_max_length_min_new_tokens_and_dict_output(family: str) -> None:
    ids, mask = left_padded_batch([4, 6])
    ref = reference(family)
    free_run = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    eos = int(free_run[1, ids.shape[1]])  # row 1's first token: min_new_tokens must suppress it
    config = GenerationConfig(max_length=ids.shape[1] + 9, min_new_tokens=4, do_sample=False, eos_token_id=eos,
                              pad_token_id=PAD, return_dict_in_generate=True)
    got = optimized(family).generate(ids, attention_mask=mask, generation_config=config)
    want = ref.generate(ids, attention_mask=mask, generation_config=config)
    assert torch.equal(got.sequences, want.sequences)
    assert got.sequences.shape[1] <= ids.shape[1] + 9
    assert int(got.sequences[1, ids.shape[1]]) != eos  # suppressed by min_new_tokens


def test_default_max_length_matches_hf() -> None:
    ids, mask = left_padded_batch([5])
    got = optimized("llama").generate(ids, attention_mask=mask, do_sample=False)
    want = reference("llama").generate(ids, attention_mask=mask, do_sample=False)
    assert torch.equal(got, want)
    assert got.shape[1] == 5 + 20  # HF's default: 20 new tokens


def test_unsupported_option_falls_back_to_hf_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    ids, mask = left_padded_batch([6, 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, repetition_penalty=1.3)
    with caplog.at_level("INFO", logger="nanoflow_fx"):
        got = optimized("llama").generate(ids, **kwargs)
    want = reference("llama").generate(ids, **kwargs)
    assert torch.equal(got, want)
    lines = [r.getMessage() for r in caplog.records if "repetition_penalty" in r.getMessage()]
    assert len(lines) == 1


def test_plain_forward_still_matches_eager() -> None:
    ids, mask = left_padded_batch([7, 4])
    got = optimized("mistral")(ids, attention_mask=mask).logits
    want = reference("mistral")(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)

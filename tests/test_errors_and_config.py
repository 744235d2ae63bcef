"""Bad input gets a clear error naming the problem and the fix; the config validates and round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from hypothesis import given
from hypothesis import strategies as st

import nanoflow_fx
from tests.helpers import BatchMixingLlama, optimized
from tests.tiny_models import build

SMALL = nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=32, page_size=4)


def test_unsupported_models_are_rejected_with_the_reason() -> None:
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                   d_kv=8))
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="encoder-decoder"):
        nanoflow_fx.optimize(t5)
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="AttentionInterface|state-space"):
        nanoflow_fx.optimize(mamba)
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="PreTrainedModel"):
        nanoflow_fx.optimize(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    bert = tf.BertModel(tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="causal LM"):
        nanoflow_fx.optimize(bert)


def test_linear_attention_hybrid_is_rejected() -> None:
    cfg = tf.Qwen3NextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_experts=2, moe_intermediate_size=16,
                             linear_num_value_heads=2, linear_num_key_heads=2)
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="linear_attention"):
        nanoflow_fx.optimize(tf.Qwen3NextForCausalLM(cfg))


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length))


def test_prompt_longer_than_max_seq_len() -> None:
    model = optimized("llama")  # max_seq_len 96
    with pytest.raises(nanoflow_fx.RequestTooLongError, match="max_seq_len=96"):
        model.generate(_ids(1, 97), max_new_tokens=1)
    with pytest.raises(nanoflow_fx.RequestTooLongError, match="max_new_tokens"):
        model.generate(_ids(1, 90), max_new_tokens=7)


def test_attention_mask_must_match_input_ids() -> None:
    model = optimized("llama")
    ids = _ids(2, 6)
    with pytest.raises(nanoflow_fx.InvalidInputError, match="shape"):
        model.generate(ids, attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=2)
    right_padded = torch.ones_like(ids)
    right_padded[1, -2:] = 0
    with pytest.raises(nanoflow_fx.InvalidInputError, match="left padding"):
        model.generate(ids, attention_mask=right_padded, max_new_tokens=2)
    with pytest.raises(nanoflow_fx.InvalidInputError, match=r"rows \[1\] have padding after"):
        model.generate(ids, attention_mask=right_padded, max_new_tokens=2)
    with pytest.raises(nanoflow_fx.InvalidInputError, match="only 0 and 1"):
        model.generate(ids, attention_mask=torch.full_like(ids, 2), max_new_tokens=2)


def test_nothing_to_generate() -> None:
    with pytest.raises(nanoflow_fx.InvalidInputError, match="max_new_tokens"):
        optimized("llama").generate(_ids(1, 6), max_length=6)


def test_capture_mismatch_is_caught_at_optimize() -> None:
    """A model whose forward does something the packed step cannot reproduce must not be accepted."""

    model = BatchMixingLlama(build("llama").config).eval()
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match=r"max \|logit diff\|"):
        nanoflow_fx.optimize(model, SMALL)
    # bf16: judged by each token row's relative RMS difference (rounding alone stays far below the bound)
    torch.manual_seed(0)
    model = BatchMixingLlama(build("llama").config).to(torch.bfloat16).eval()
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match=r"relative RMS logit diff"):
        nanoflow_fx.optimize(model, SMALL)
    nanoflow_fx.optimize(build("llama", dtype=torch.bfloat16), SMALL)  # the plain model in bf16 passes


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_batch_size", 0, "max_batch_size must be a positive int"),
        ("max_seq_len", -5, "max_seq_len"),
        ("page_size", 2.5, "page_size"),
        ("num_pages", 0, "num_pages"),
        ("num_nanobatches", "two", "num_nanobatches"),
        ("attention_backend", "cudnn", "attention_backend"),
        ("max_num_tokens", True, "max_num_tokens"),
        ("check_capture", "yes", "check_capture"),
        ("prefix_offload_gib", -1.0, "prefix_offload_gib must be a finite number >= 0"),
        ("prefix_offload_gib", float("inf"), "prefix_offload_gib"),
    ],
)
def test_invalid_config_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nanoflow_fx.NanoFlowConfig(**{field: value})  # type: ignore[arg-type]


def test_host_offload_needs_prefix_caching() -> None:
    with pytest.raises(ValueError, match="prefix_offload_gib keeps evicted prefix-cache pages: it needs "
                                         "prefix_caching=True"):
        nanoflow_fx.NanoFlowConfig(prefix_caching=False, prefix_offload_gib=1.0)
    assert nanoflow_fx.NanoFlowConfig(prefix_offload_gib=1.0).prefix_offload_gib == 1.0


@pytest.mark.parametrize(("field", "value"), [("sm_partition", "half"), ("memory_sms", 0),
                                              ("split_decode_graphs", "yes")])
def test_invalid_experimental_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        nanoflow_fx.ExperimentalConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        nanoflow_fx.NanoFlowConfig.from_dict({"experimental": {field: value}})


def test_research_knobs_live_in_the_experimental_sub_config() -> None:
    """sm_partition and memory_sms are research knobs: a NanoFlowConfig of them is refused, naming where they
    moved; the sub-config round-trips through dicts."""
    for field in ("sm_partition", "memory_sms"):
        with pytest.raises(ValueError, match=f"moved to its experimental sub-config.*{field}"):
            nanoflow_fx.NanoFlowConfig.from_dict({field: "soft" if field == "sm_partition" else 48})
        with pytest.raises(TypeError, match=field):
            nanoflow_fx.NanoFlowConfig(**{field: "soft"})  # type: ignore[arg-type]
    config = nanoflow_fx.NanoFlowConfig(experimental=nanoflow_fx.ExperimentalConfig(sm_partition="soft", memory_sms=48))
    assert config.to_dict()["experimental"] == {"sm_partition": "soft", "memory_sms": 48,
                                                "split_decode_graphs": False}
    assert nanoflow_fx.NanoFlowConfig.from_dict(config.to_dict()) == config
    assert nanoflow_fx.NanoFlowConfig().experimental == nanoflow_fx.ExperimentalConfig(sm_partition="off")
    with pytest.raises(ValueError, match="ExperimentalConfig has no field"):
        nanoflow_fx.NanoFlowConfig.from_dict({"experimental": {"sms": 1}})
    with pytest.raises(ValueError, match="must be an ExperimentalConfig"):
        nanoflow_fx.NanoFlowConfig(experimental={"sm_partition": "soft"})  # type: ignore[arg-type]


def test_config_rejects_unknown_fields_and_is_frozen() -> None:
    with pytest.raises(ValueError, match="no field"):
        nanoflow_fx.NanoFlowConfig.from_dict({"max_batch": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        nanoflow_fx.NanoFlowConfig().page_size = 8  # type: ignore[misc]


@given(
    max_batch_size=st.integers(1, 4096), max_seq_len=st.integers(1, 1 << 20), page_size=st.sampled_from([1, 16, 64]),
    num_pages=st.none() | st.integers(1, 10**6), num_nanobatches=st.sampled_from([1, 2, 4, "auto"]),
    attention_backend=st.sampled_from(["auto", "torch", "flashinfer"]),
)
def test_config_round_trips(**values: object) -> None:
    config = nanoflow_fx.NanoFlowConfig(**values)  # type: ignore[arg-type]
    assert nanoflow_fx.NanoFlowConfig.from_dict(config.to_dict()) == config


def test_batch_of_one_optimizes_and_generates() -> None:
    """max_batch_size=1 (the probe then checks one prompt) serves single-sequence generation."""
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=1, max_seq_len=32, page_size=4)
    model = nanoflow_fx.optimize(build("llama"), config)
    ids = _ids(1, 6)
    want = build("llama").generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)

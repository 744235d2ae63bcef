"""Which models nanoflow_fx can capture, and the discovery forward that learns each attention layer's shape."""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import GenerationMixin, PreTrainedModel

from nanoflow_fx.capture.hf_attention import METADATA_KWARG, ShapeProbe
from nanoflow_fx.errors import UnsupportedModelError
from nanoflow_fx.ops.backend import AttentionConfig

__all__ = ["check_supported", "discover_layers"]

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_supported(model: object) -> None:
    """Raise `UnsupportedModelError` naming the reason if `model` is not a softmax-attention causal LM."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"optimize() takes a transformers PreTrainedModel, got {type(model).__name__}")
    name, config = type(model).__name__, model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; nanoflow_fx supports decoder-only LMs")
    if not isinstance(model, GenerationMixin) or model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{name} is not a causal LM with an LM head (use its *ForCausalLM class)")
    other = sorted(set(getattr(config, "layer_types", None) or []) - _ATTENTION_LAYER_TYPES)
    if other:
        raise UnsupportedModelError(
            f"{name} has layers of type {other}; nanoflow_fx supports softmax attention layers only "
            f"({sorted(_ATTENTION_LAYER_TYPES)}), not state-space or linear-attention hybrids"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' AttentionInterface "
            "(_supports_attention_backend is False), so nanoflow_fx cannot capture its attention"
        )
    if getattr(config, "model_type", "") in {"mamba", "mamba2", "rwkv", "falcon_mamba", "xlstm"}:
        raise UnsupportedModelError(f"{name} is a recurrent / state-space model, not softmax attention")


@torch.no_grad()
def discover_layers(model: PreTrainedModel) -> list[AttentionConfig]:
    """Each attention layer's configuration, by layer index: a 2-token forward whose attention only records it.

    A meta-device model (graph inspection without weights) runs it on fake tensors, since HF's mask code
    reads values; others run it for real (2 tokens), since some kernels' fake rules are stricter than their
    eager paths (e.g. grouped_mm's dtype check against its fp32 CPU fallback).
    """
    probe = ShapeProbe()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if model.device.type == "meta" else contextlib.nullcontext()
    with fake:
        ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        model(input_ids=ids, use_cache=False, **{METADATA_KWARG: probe})
    indices = sorted(probe.layers)
    if not indices:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention layer called the attention interface")
    if indices != list(range(len(indices))):
        raise UnsupportedModelError(f"{type(model).__name__}: attention layer indices {indices} are not 0..N-1")
    return [probe.layers[i] for i in indices]

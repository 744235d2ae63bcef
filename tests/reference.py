"""Reference K/V: an attention function that runs the model's own eager attention and records key/value."""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

_RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _recording_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    _RECORDED[module.layer_idx] = (key[0].transpose(0, 1).clone(), value[0].transpose(0, 1).clone())  # [T, Hkv, D]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("nanoflow_test_record", _recording_attention)
AttentionMaskInterface.register("nanoflow_test_record", eager_mask)


@torch.no_grad()
def eager_logits_and_kv(model: PreTrainedModel, tokens: list[int]) -> tuple[torch.Tensor, dict[int, tuple]]:
    """Logits [T, V] of HF's eager forward over `tokens`, and each layer's (K, V) [T, Hkv, D]."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("nanoflow_test_record")
    try:
        _RECORDED.clear()
        logits = model(torch.tensor([tokens], device=model.device), use_cache=False).logits[0]
        return logits, dict(_RECORDED)
    finally:
        model.set_attn_implementation(previous)

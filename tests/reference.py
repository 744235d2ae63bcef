"""Reference K/V: an attention function that runs the model's own eager attention and records key/value; and one
that attends over K/V fake-quantised as an FP8 (e4m3) KV cache stores them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


# ------------------------------------------------------------------------------------------------ FP8 KV cache
E4M3_MAX = 448.0
_FP8_SCALES: dict[int, tuple[float, float]] = {}


def fake_quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an e4m3 KV cache with this scale gives back of `x`, spelled out independently of nanoflow_fx: x / scale
    clamped to +-448, rounded to e4m3 (torch's cast: nearest even), times scale (fp32 arithmetic, x's dtype)."""
    stored = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (stored.to(torch.float32) * scale).to(x.dtype)


def _fp8_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    k_scale, v_scale = _FP8_SCALES[module.layer_idx]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, fake_quantize_fp8(key, k_scale), fake_quantize_fp8(value, v_scale), attention_mask,
                 **kwargs)


AttentionInterface.register("nanoflow_test_fp8", _fp8_attention)
AttentionMaskInterface.register("nanoflow_test_fp8", eager_mask)


@contextmanager
def fp8_kv_attention(model: PreTrainedModel, scales: list[tuple[float, float]]) -> Iterator[PreTrainedModel]:
    """Within the block, `model`'s eager forward (and HF's `generate()`) attends over its K/V fake-quantised as an
    e4m3 cache with per-layer `scales` (k_scale, v_scale) stores them: the reference of a step over an FP8 cache."""
    previous = model.config._attn_implementation
    _FP8_SCALES.clear()
    _FP8_SCALES.update(enumerate(scales))
    model.set_attn_implementation("nanoflow_test_fp8")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        _FP8_SCALES.clear()

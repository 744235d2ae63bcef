"""The scales of an FP8 KV cache (`NanoFlowConfig.kv_cache_dtype="fp8_e4m3"`): read from the model, or calibrated
on `optimize()`'s probe; and the eager forward over fake-quantised K/V that the capture check compares with.

Scales from the model: FP8 checkpoints made for vLLM-style serving (compressed-tensors' `kv_cache_scheme`, NVIDIA
ModelOpt) carry a per-tensor `k_scale` and `v_scale` for each attention layer (`model.layers.N.self_attn.k_scale`;
older ones one `kv_scale` for both), and libraries that load them (compressed-tensors) register them on the
attention module as parameters or buffers. transformers itself neither loads nor applies them, so a model
without such a library has none, and its cache keeps scales of 1.0. Both mean "stored = value / scale", as here.
Only tensors count: a float attribute of that name is part of the model's own arithmetic (Gemma-4's `k_scale`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture.hf_attention import METADATA_KWARG, KVProbe
from nanoflow_fx.errors import NanoFlowError
from nanoflow_fx.ops import kv_quant

__all__ = ["calibrate", "checkpoint_scales", "eager_logits", "clamped_layers"]

log = logging.getLogger(__name__)


def checkpoint_scales(model: PreTrainedModel, num_layers: int) -> list[tuple[float, float]] | None:
    """Each attention layer's (k_scale, v_scale) from tensors on its attention module (`k_scale` and `v_scale`,
    or one `kv_scale`), None if no module has any. A per-head scale tensor counts by its largest element (the
    per-tensor scale that clamps nothing any head's scale keeps)."""
    found: dict[int, tuple[float, float]] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        pair = _module_scales(module)
        if pair is None or not isinstance(layer_idx, int):
            continue
        if layer_idx in found and found[layer_idx] != pair:
            raise NanoFlowError(f"{type(model).__name__}: two modules of attention layer {layer_idx} carry different "
                                f"KV scales ({found[layer_idx]} and {pair} on {name})")
        found[layer_idx] = pair
    if not found:
        return None
    missing = sorted(set(range(num_layers)) - set(found))
    if missing:
        raise NanoFlowError(f"{type(model).__name__} carries KV-cache scales (k_scale/v_scale) for attention layers "
                            f"{sorted(found)} but not {missing}; an FP8 checkpoint has them for every layer: set "
                            "calibrate_kv_scales=True to measure them instead")
    bad = {i: p for i, p in found.items() if not all(0 < x < float("inf") for x in p)}
    if bad:
        raise NanoFlowError(f"{type(model).__name__}'s KV-cache scales must be positive and finite; layers {bad}")
    log.info("nanoflow_fx: FP8 KV cache scales read from the model's k_scale/v_scale")
    return [found[i] for i in range(num_layers)]


def _module_scales(module: torch.nn.Module) -> tuple[float, float] | None:
    def tensor(name: str) -> torch.Tensor | None:
        value = getattr(module, name, None)
        return value if isinstance(value, torch.Tensor) and value.numel() > 0 else None

    k, v = tensor("k_scale"), tensor("v_scale")
    if k is None or v is None:
        k = v = tensor("kv_scale")
    if k is None or v is None:
        return None
    return float(k.detach().float().max()), float(v.detach().float().max())


@torch.no_grad()
def eager_logits(model: PreTrainedModel, prompts: Sequence[Sequence[int]],
                 scales: list[tuple[float, float]] | None = None,
                 record: bool = False) -> tuple[torch.Tensor, KVProbe | None]:
    """The eager model's logits over each prompt (alone, concatenated: [sum of lengths, vocab], fp32), attending
    over K/V fake-quantised with `scales` where given (an FP8 cache's reference), and, with scales or `record`, the
    probe that recorded each layer's largest |K| and |V| (else None: the plain forward, untouched). The model's
    attention must be nanoflow's (`optimize()` switched it)."""
    probe = KVProbe(scales) if scales is not None or record else None
    extra = {METADATA_KWARG: probe} if probe is not None else {}
    logits = [model(torch.tensor([p], device=model.device), use_cache=False, **extra).logits[0] for p in prompts]
    return torch.cat(logits).float(), probe


def calibrate(model: PreTrainedModel, prompts: Sequence[Sequence[int]], num_layers: int,
              margin: float = kv_quant.KV_SCALE_MARGIN) -> list[tuple[float, float]]:
    """Each layer's (k_scale, v_scale) from an eager forward of `prompts`: margin x amax / 448 (`scale_from_amax`)."""
    _, probe = eager_logits(model, prompts, record=True)
    assert probe is not None
    scales = [tuple(kv_quant.scale_from_amax(a, margin) for a in probe.amax.get(i, (0.0, 0.0)))
              for i in range(num_layers)]
    log.info("nanoflow_fx: FP8 KV cache scales calibrated on the probe: k %s, v %s",
             _span([s[0] for s in scales]), _span([s[1] for s in scales]))
    return [(k, v) for k, v in scales]


def clamped_layers(probe: KVProbe, scales: list[tuple[float, float]]) -> dict[int, tuple[float, float]]:
    """Layers whose recorded |K| or |V| exceeds 448 x its scale (clamped in an FP8 cache): index -> how many times
    the range (K, V)."""
    over = {}
    for i, (k_max, v_max) in probe.amax.items():
        ratios = (k_max / (kv_quant.E4M3_MAX * scales[i][0]), v_max / (kv_quant.E4M3_MAX * scales[i][1]))
        if max(ratios) > 1:
            over[i] = ratios
    return over


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.3g}..{max(values):.3g}" if values else "-"

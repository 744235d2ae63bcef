"""The attention function nanoflow_fx registers in transformers' `AttentionInterface`.

With `nanoflow_metadata` among the forward's keyword arguments (the token-packed step), attention becomes one
`nanoflow::paged_attention` call. Without it (a plain `model(...)` or HF's own `generate()`), it runs the plain
forward's attention (`PlainAttention`: the model's own eager attention, or SDPA), so the optimized model behaves
as before for every other use. The matching mask function builds that implementation's mask for plain calls; in
the packed step (being compiled) it builds the eager mask, which is unused and dead-code elimination drops.

The config names "nanoflow" from `optimize()` on and is never flipped per call (a per-call switch of the shared
config raced with other threads' forwards, and a changed name would make Dynamo recompile the step); the plain
forward's choice is kept beside it, per config, in `PLAIN`.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from nanoflow_fx.errors import UnsupportedModelError
from nanoflow_fx.ops import AttentionMetadata, kv_quant, paged_attention
from nanoflow_fx.ops.backend import AttentionConfig

__all__ = ["ATTN_IMPLEMENTATION", "PLAIN", "PLAIN_ATTENTION", "KVProbe", "PlainAttention", "ShapeProbe", "register"]

ATTN_IMPLEMENTATION = "nanoflow"
METADATA_KWARG = "nanoflow_metadata"
PLAIN_ATTENTION = ("eager", "sdpa")  # what the plain forward may run beside nanoflow's step (see PlainAttention)


class PlainAttention:
    """Which implementation each optimized model's plain forward uses, by config (the attention and mask functions
    only see the module's config). Eager or SDPA: their attention functions take the masks their mask functions
    build from the same arguments; flash and flex attention depend on model-level branches on the config's name,
    so a model set to one of those runs its plain forward on eager attention."""

    def __init__(self) -> None:
        self._choice: dict[int, str] = {}

    def set(self, config: Any, plain: str) -> None:
        """`config` and its sub-configs (what their modules read) run `plain` in plain forwards."""
        if plain not in PLAIN_ATTENTION:
            raise ValueError(f"plain attention must be one of {PLAIN_ATTENTION}, got {plain!r}")
        for c in [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))]:
            if c is not None:
                if id(c) not in self._choice:
                    weakref.finalize(c, self._choice.pop, id(c), None)
                self._choice[id(c)] = plain

    def get(self, config: Any) -> str:
        return self._choice.get(id(config), "eager")


PLAIN = PlainAttention()
_Fn = Callable[..., Any]


@dataclass
class ShapeProbe:
    """Passed instead of `AttentionMetadata` in a discovery forward: records each layer's `AttentionConfig`
    by layer index."""

    layers: dict[int, AttentionConfig] = field(default_factory=dict)


@dataclass
class KVProbe:
    """Passed instead of `AttentionMetadata` in an eager forward: the forward runs the plain attention (as without
    metadata) and records each layer's largest |K| and |V| (`amax`, by layer index: what the step would write to
    the KV cache). With `scales` (per layer (k_scale, v_scale)), it attends over K and V fake-quantised as an FP8
    cache stores them (`ops.kv_quant.fake_quantize`): the eager reference of a step over an FP8 cache."""

    scales: list[tuple[float, float]] | None = None
    amax: dict[int, tuple[float, float]] = field(default_factory=dict)

    def observe(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_max, v_max = (float(x.detach().abs().amax()) if x.numel() else 0.0 for x in (key, value))
        seen = self.amax.get(layer_idx, (0.0, 0.0))
        self.amax[layer_idx] = (max(seen[0], k_max), max(seen[1], v_max))
        if self.scales is None:
            return key, value
        k_scale, v_scale = self.scales[layer_idx]
        return kv_quant.fake_quantize(key, k_scale), kv_quant.fake_quantize(value, v_scale)


def register() -> None:
    """Register the attention and mask functions under `ATTN_IMPLEMENTATION` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, nanoflow_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _nanoflow_mask)


def _nanoflow_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The plain forward's mask (its implementation's); eager's while compiled (the packed step: unused)."""
    plain = "eager" if torch.compiler.is_compiling() else PLAIN.get(config)
    # (transformers' registries infer as dicts of `function`, which mypy cannot call)
    mask = eager_mask if plain == "eager" else cast(_Fn, AttentionMaskInterface._global_mapping[plain])
    return mask(*args, config=config, **kwargs)


def nanoflow_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    meta = kwargs.pop(METADATA_KWARG, None)
    if isinstance(meta, KVProbe):
        key, value = meta.observe(_layer_index(module), key, value)
        meta = None
    if meta is None:
        plain = "eager" if torch.compiler.is_compiling() else PLAIN.get(getattr(module, "config", None))
        fallback = _eager_fallback(module) if plain == "eager" else cast(_Fn, AttentionInterface._global_mapping[plain])
        return fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer_idx, spec = _layer_spec(module, key, value, sliding_window, softcap, kwargs, query.shape[1], scale)
    if isinstance(meta, ShapeProbe):
        meta.layers[layer_idx] = spec
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    if not isinstance(meta, AttentionMetadata):
        raise TypeError(f"{METADATA_KWARG} must be an AttentionMetadata, got {type(meta).__name__}")
    cache = meta.kv_caches[layer_idx]
    # (a bf16 model over an e4m3 cache attends with its query in fp16, converted here, inside the kernels Inductor
    # fuses before attention, and the output back: `kv_quant.query_dtype`)
    q = kv_quant.to_query(query[0].transpose(0, 1), kv_quant.query_dtype(query.dtype, cache.dtype))  # [T, H, D]
    out = paged_attention(
        q, key[0].transpose(0, 1), value[0].transpose(0, 1),  # [T, heads, D]
        cache, *meta.tensors(),
        scale, spec.sliding_window, spec.softcap, meta.backend,
        meta.kv_scales[layer_idx] if meta.kv_scales else None,
    )
    return out.to(query.dtype).unsqueeze(0), None  # [1, T, H, D], as HF's attention functions return


def _layer_spec(
    module: torch.nn.Module,
    key: torch.Tensor,
    value: torch.Tensor,
    sliding_window: int | None,
    softcap: float | None,
    kwargs: dict[str, Any],
    num_qo_heads: int,
    scaling: float,
) -> tuple[int, AttentionConfig]:
    name = type(module).__name__
    layer_idx = _layer_index(module)
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise UnsupportedModelError(f"{name} uses non-causal attention; nanoflow_fx supports causal decoders only")
    for sink_kwarg in ("s_aux", "sinks"):
        if kwargs.get(sink_kwarg) is not None:
            raise UnsupportedModelError(f"{name} uses attention sinks (`{sink_kwarg}`), which nanoflow_fx lacks")
    if key.shape[0] != 1:
        raise ValueError(f"the packed step expects batch dimension 1, got key shape {tuple(key.shape)}")
    if key.shape[-1] != value.shape[-1]:
        raise UnsupportedModelError(f"{name} has key head dim {key.shape[-1]} != value head dim {value.shape[-1]}")
    return layer_idx, AttentionConfig(
        num_qo_heads=num_qo_heads,
        num_kv_heads=key.shape[1],
        head_dim=key.shape[-1],
        scaling=scaling,
        sliding_window=int(sliding_window) if sliding_window else 0,
        softcap=float(softcap) if softcap else 0.0,
    )


def _layer_index(module: torch.nn.Module) -> int:
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise UnsupportedModelError(f"{type(module).__name__} has no integer `layer_idx`; nanoflow_fx needs it to find "
                                    "its KV cache")
    return layer_idx


def _eager_fallback(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The model's own `eager_attention_forward` (it honours every variant the model has)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedModelError(
            f"{type(module).__name__}: its modeling file has no eager_attention_forward to serve plain forwards"
        )
    return fn

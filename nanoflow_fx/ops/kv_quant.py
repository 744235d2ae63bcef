"""FP8 (e4m3) KV-cache values: how keys and values are stored, scaled per layer, and read back.

A page of an FP8 cache holds `x / scale` clamped to +-448 (e4m3's largest finite value) and rounded to e4m3
(round to nearest even); a reader multiplies by `scale` again. Each layer has one scale for its keys and one for its
values (fp32, kept on the device as a [2] tensor: k_scale, v_scale), 1.0 unless a checkpoint or the calibration
gives others, as vLLM, SGLang and TensorRT-LLM do. The clamp comes before the cast: a cast alone turns values past
the range into NaN on some torch versions, and an outlier key would then poison every attention row that reads it.
Every writer (the reference, the Triton kernel) and the eager fake-quantisation the capture check compares against
use these rules, so they agree to the bit where their arithmetic does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["E4M3_MAX", "FP8_KV_DTYPE", "KV_SCALE_MARGIN", "cache_dtype", "dequantize", "fake_quantize", "is_fp8",
           "quantize", "scale_from_amax"]

FP8_KV_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_KV_DTYPE).max)  # 448.0
# Calibration headroom: a scale of (at least) margin x amax / 448 keeps values up to `margin` times the probe's
# largest one unclamped, at the price of nothing but the smallest values (e4m3's relative precision is the same over
# its normal range, 2^-6 .. 448). vLLM's calibration keeps a similar headroom (amax / 200 for keys).
KV_SCALE_MARGIN = 2.0


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the KV pages `NanoFlowConfig.kv_cache_dtype` asks for ("auto": the model's dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8_e4m3":
        return FP8_KV_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; known: 'auto', 'fp8_e4m3'")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = FP8_KV_DTYPE) -> torch.Tensor:
    """x / scale, clamped to +-448, as e4m3 (fp32 arithmetic; +-inf become +-448, NaN stays NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored e4m3 values back in `dtype`: x * scale, computed in fp32 (fp64 for fp64)."""
    compute = torch.promote_types(dtype, torch.float32)
    return (x.to(compute) * scale).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """What a reader of an FP8 cache sees of `x` (same dtype as x): `dequantize(quantize(x, scale), scale)`."""
    return dequantize(quantize(x, scale), scale, x.dtype)


def scale_from_amax(amax: float, margin: float = KV_SCALE_MARGIN) -> float:
    """The scale that stores values up to `margin` x `amax` without clamping, rounded up to a power of two (1.0 for
    an all-zero or non-finite tensor, where no scale is better than another). A power of two divides and multiplies
    exactly in every float format: the stored value times the scale is exact in bf16 too, and so is a query
    multiplied by it (FlashInfer's k_scale); the headroom it adds (up to 2x) costs only the smallest values' bits."""
    if not amax > 0 or amax == float("inf"):
        return 1.0
    return float(2.0 ** math.ceil(math.log2(float(amax) * margin / E4M3_MAX)))

"""FP8 (e4m3) KV-cache values: how keys and values are stored, scaled per layer, and read back.

A page of an FP8 cache holds `x / scale` clamped to +-448 (e4m3's largest finite value) and rounded to e4m3
(round to nearest even); a reader multiplies by `scale` again. Each layer has one scale for its keys and one for its
values (fp32, kept on the device as a [2] tensor: k_scale, v_scale), 1.0 unless a checkpoint or the calibration
gives others, as vLLM, SGLang and TensorRT-LLM do. The clamp comes before the cast: a cast alone turns values past
the range into NaN on some torch versions, and an outlier key would then poison every attention row that reads it.
Every writer (the reference, the Triton kernel) and the eager fake-quantisation the capture check compares against
use these rules, so they agree to the bit where their arithmetic does.

A bf16 model's attention reads an e4m3 cache with its query in fp16 (`query_dtype`): GPUs of compute capability
8.9+ convert e4m3 to fp16 in one instruction per two values, to bf16 only in software (several per value), and
FlashInfer converts each K/V tile to its query's type in its inner loop. Measured (`python3 -m
benchmarks.bench_kv_dtype`, benchmarks/RESULTS.md): its decode over e4m3 took 0.60x the time over bf16 with an fp16
query, 0.72x with a bf16 one; its prefill 1.59x against 2.07x. The captured step converts the query (`to_query`) inside
the kernels Inductor fuses before attention, and the output back. fp16 holds every e4m3 value exactly and a query
to 11 significant bits (bf16: 8) up to 65504; beyond that the query saturates (`to_query` clamps), and an output up
to 448 x v_scale must stay below 65504 too (`check_query_range`: v_scale <= 146).
"""

from __future__ import annotations

import math

import torch

__all__ = ["E4M3_MAX", "FP8_KV_DTYPE", "FP16_MAX", "KV_SCALE_MARGIN", "cache_dtype", "check_query_range",
           "dequantize", "fake_quantize", "is_fp8", "quantize", "query_dtype", "scale_from_amax", "to_query"]

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


FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504.0


def query_dtype(model_dtype: torch.dtype, kv_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention takes its query in (and returns its output in) over pages of `kv_dtype`: fp16 for a bf16
    model over an e4m3 cache (module docstring), else the model's."""
    return torch.float16 if model_dtype == torch.bfloat16 and is_fp8(kv_dtype) else model_dtype


def to_query(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q` in `dtype` (`query_dtype`'s): converted through fp32 and clamped to fp16's range when that is fp16 (no
    inf from a query past +-65504: it saturates there instead)."""
    if q.dtype == dtype:
        return q
    if dtype == torch.float16:
        return q.float().clamp(-FP16_MAX, FP16_MAX).to(dtype)
    return q.to(dtype)


def check_query_range(query: torch.dtype, kv_scales: list[tuple[float, float]]) -> None:
    """Raise if an output attention computes in `query` (fp16: `query_dtype`) could overflow it: a layer's values,
    up to 448 x v_scale, past 65504. A calibration or checkpoint with such scales needs the model's own dtype for
    the cache."""
    if query != torch.float16:
        return
    bad = {i: v for i, (_, v) in enumerate(kv_scales) if v * E4M3_MAX > FP16_MAX}
    if bad:
        raise ValueError(
            f"FP8 KV cache: v_scale {max(bad.values()):g} (layers {sorted(bad)}) lets values reach "
            f"{max(bad.values()) * E4M3_MAX:g}, past 65504: a bf16 model reads an e4m3 cache with its query and "
            f"output in fp16, which cannot hold them. Use kv_cache_dtype='auto' for this model (its values are too "
            f"large for an e4m3 cache read so), or scales with v_scale <= {FP16_MAX / E4M3_MAX:.1f}")


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

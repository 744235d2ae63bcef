"""FP8 (e4m3) linear arithmetic: per-row scales, `torch._scaled_mm`, and the op an FP8 linear module calls.

The scheme ("w8a8 dynamic", as vLLM and SGLang serve FP8 checkpoints): each weight row (output channel) has one fp32
scale, fixed when the weight is quantised; each activation row (token) gets one fp32 scale computed on the fly
from its largest magnitude. A row `r` is stored as `q = clamp(r / s, -448, 448)` cast to float8_e4m3fn, with
`s = max(amax(|r|) / 448, tiny)` (448: e4m3's largest finite value; the floor keeps an all-zero row finite).
Then `x @ w.T ~= (q_x * s_x) @ (q_w * s_w).T = s_x * (q_x @ q_w.T) * s_w.T`: one FP8 GEMM with row-wise scales.

- `quantize_rows(x)`: the per-row quantisation, in plain torch ops (so that, emitted into the captured step by the
  `fp8_linears` pass, Inductor fuses it into the kernel that produces `x`: the norm, the activation function).
- `scaled_linear(...)`: the GEMM on quantised operands (`torch._scaled_mm`), bias added after.
- `nanoflow::fp8_linear(x, weight, weight_scale, bias)`: what an FP8 linear module's forward calls
  (`capture.fp8_linears.Fp8Linear`). Its implementation is the reference: the same quantisation of `x`, then the
  dequantised operands multiplied in fp32. In a captured step it is one node, which the `fp8_linears` pass
  lowers to `quantize_rows` + `scaled_linear`.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from nanoflow_fx.ops.kv_quant import E4M3_MAX as FP8_MAX
from nanoflow_fx.ops.kv_quant import FP8_KV_DTYPE as FP8_DTYPE

__all__ = ["FP8_DTYPE", "FP8_MAX", "fp8_gemm_error", "fp8_linear", "quantize_rows", "scaled_linear"]

# (e4m3 and its largest finite value, 448, as the FP8 KV cache stores them: one definition for both)
_MIN_SCALE = float(torch.finfo(torch.float32).tiny)
_PAD_ROWS = 15


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [..., K] -> (float8_e4m3fn [..., K], fp32 scales [..., 1]) with `x ~= q * scale` row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (a max is exact in any dtype)
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    # (the clamp: amax / 448 rounds, so the row's largest value may divide to a hair above 448, where the cast to
    # e4m3fn, which has no infinity, would give NaN)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    """`x_q` [T, K] e4m3 (scales [T, 1]) times `weight` [N, K] e4m3 (scales [N, 1]) transposed -> [T, N]
    `out_dtype`, plus `bias`. K and N must be multiples of 16 (`torch._scaled_mm`)."""
    # Row-wise scales with fp32 out run on cuBLASLt, which refuses a single row (CUBLAS_STATUS_NOT_SUPPORTED at M=1):
    # zero rows of scale 1 make M >= 16 whatever it was, so no shape is guarded. (fp32 models only: their pieces
    # then mix tokens for `passes.annotate`, so they are not nano-batched.)
    # cuBLASLt also refuses a scale vector that does not start on 16 bytes, as a row slice of one may not: such a
    # slice is copied (a few bytes). Eager calls only: a traced call (the captured step's) has no address to check.
    if x_q.is_cuda and _unaligned(x_scale):
        x_scale = x_scale.clone()
    rows, pad = x_q.shape[0], out_dtype == torch.float32 and x_q.is_cuda
    if pad:
        x_q = torch.cat([x_q, x_q.new_zeros(_PAD_ROWS, x_q.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_ones(_PAD_ROWS, 1)])
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=out_dtype,
                           use_fast_accum=use_fast_accum)
    if pad:
        out = out[:rows]
    return out if bias is None else out + bias


def _unaligned(t: torch.Tensor) -> bool:
    """Whether `t` (a real tensor; a traced one has no address) does not start on 16 bytes."""
    return not is_fake(t) and t.data_ptr() % 16 != 0


def fp8_gemm_error(device: torch.device, dtype: torch.dtype) -> str:
    """Why `scaled_linear` cannot run on `device` with `dtype` output (empty if it can): tried on one token row
    times a 16x16 weight (a decode's shape)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"FP8 GEMMs need a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper), not {name}"
    try:
        x, x_scale = quantize_rows(torch.ones(1, 16, device=device))
        w, w_scale = quantize_rows(torch.ones(16, 16, device=device))
        scaled_linear(x, x_scale, w, w_scale, None, dtype, use_fast_accum=False)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"this torch build has no FP8 GEMM (torch._scaled_mm) for {dtype} on {device.type} ({e})"
    return ""


@torch.library.custom_op("nanoflow::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """`x` [..., K] (the model's dtype) through an FP8 linear: `weight` [N, K] float8_e4m3fn with `weight_scale`
    [N, 1] fp32 -> [..., N] in `x`'s dtype. The reference arithmetic: `x` quantised per row (`quantize_rows`),
    both operands dequantised to fp32 and multiplied, the bias added, the result rounded to `x`'s dtype once."""
    x_q, x_scale = quantize_rows(x)
    out = (x_q.float() * x_scale) @ (weight.float() * weight_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@fp8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])

"""Writing a step's new keys/values into the paged KV cache: one fused Triton kernel on CUDA.

The reference (`reference.write_kv_`) indexes the 5-D cache with page and offset tensors: per layer two integer
kernels and two `index_put_` kernels that compute every element's address, far below the memory bandwidth such a
copy could use. The kernel here runs one program per token, reads its slot once and copies its K and V rows (all KV
heads) with the cast to the cache's dtype (what it saves a dense step: benchmarks/RESULTS.md, "fused KV write").
Into an FP8 cache it stores x / scale clamped to +-448, rounded to nearest even (`kv_quant`): the reference's bits.
"""

from __future__ import annotations

import torch

from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.reference import write_kv_

__all__ = ["write_kv", "write_kv_triton"]

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves every device then
    triton = None


if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, cache_ptr, slot_ptr, scale_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cp, stride_ckv, stride_cs, stride_ch,
        PAGE_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr,
        D_PAD: tl.constexpr, QUANTIZE: tl.constexpr, E4M3_MAX: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < HEADS) & (d < HEAD_DIM)
        row = cache_ptr + page * stride_cp + offset * stride_cs + h * stride_ch + d
        key = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
        value = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
        if QUANTIZE:  # (division rounded to nearest, as torch's: the same e4m3 bits as the reference)
            key = tl.clamp(tl.math.div_rn(key.to(tl.float32), tl.load(scale_ptr)), -E4M3_MAX, E4M3_MAX)
            value = tl.clamp(tl.math.div_rn(value.to(tl.float32), tl.load(scale_ptr + 1)), -E4M3_MAX, E4M3_MAX)
        tl.store(row, key.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(row + stride_ckv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scale: torch.Tensor | None = None) -> None:
    """Store this step's keys/values (k, v: [T, Hkv, D]) at flat slots `slot_mapping` of `kv_cache`
    ([P, 2, page, Hkv, D]; an FP8 cache quantised by `kv_scale`, [2] fp32): the Triton kernel on CUDA, else the
    reference."""
    if triton is None or not kv_cache.is_cuda or k.shape[0] == 0 or not _kernel_writes(kv_cache):
        write_kv_(kv_cache, k, v, slot_mapping, kv_scale)
    else:
        write_kv_triton(kv_cache, k, v, slot_mapping, kv_scale)


def _kernel_writes(kv_cache: torch.Tensor) -> bool:
    """Whether Triton can store this cache's dtype on its device (e4m3 needs compute capability 8.9)."""
    return not kv_quant.is_fp8(kv_cache.dtype) or torch.cuda.get_device_capability(kv_cache.device) >= (8, 9)


def write_kv_triton(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scale: torch.Tensor | None = None) -> None:
    """The kernel itself (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous")
    quantize = kv_quant.is_fp8(kv_cache.dtype)
    if quantize and kv_scale is None:
        kv_scale = torch.ones(2, dtype=torch.float32, device=kv_cache.device)
    heads, dim = k.shape[1], k.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k, v, kv_cache, slot_mapping, kv_scale if quantize else slot_mapping,  # (unread unless quantising)
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        PAGE_SIZE=kv_cache.shape[2], HEADS=heads, HEAD_DIM=dim, H_PAD=triton.next_power_of_2(heads),
        D_PAD=triton.next_power_of_2(dim), QUANTIZE=quantize, E4M3_MAX=kv_quant.E4M3_MAX,
    )

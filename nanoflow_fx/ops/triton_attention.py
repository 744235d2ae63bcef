"""Paged attention in Triton: one program per (query token, KV head), online softmax over the token's KV.

Needs no host-side planning and no host/device sync, so it runs inside CUDA graphs. Each program finds its
request by counting `qo_indptr` entries <= its token (requests padded with empty entries are skipped), loads
the query heads that share its KV head (GQA: K/V are read once per group), and walks its request's pages in
blocks of BLOCK_N tokens from the window start to its own position. Runs under TRITON_INTERPRET=1 on the CPU.

An FP8 (e4m3) cache is read as stored, one byte an element, and each tile is converted in registers right before
its dot: K to the query's dtype (bf16/fp16: exact, e4m3 is a subset) for the same 16-bit Q @ K^T as a half cache,
V to what the P @ V dot takes (as for a half cache). The layer's scales never touch a tile: k_scale joins the
softmax scale, v_scale multiplies the output once. Compute capability 8.9 or newer (Triton's e4m3 type).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.backend import AttentionBackend, AttentionConfig, register

__all__ = ["paged_attention_triton", "TritonBackend"]


@triton.jit
def _paged_attention_kernel(
    q_ptr, cache_ptr, out_ptr, qo_ptr, kvp_ptr, kvi_ptr, last_ptr, scale_ptr,
    num_requests, num_kv_heads, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cp, stride_ckv, stride_cs, stride_ch,
    scaling, softcap, sliding_window,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr, KV_EVICTION: tl.constexpr,
    KV_FP8: tl.constexpr, FP16_DOTS: tl.constexpr, HEADS_ADJACENT: tl.constexpr,
):
    if HEADS_ADJACENT:  # one row of programs: a token's KV heads side by side (launched, and so reading, together)
        t = tl.program_id(0) // num_kv_heads
        kvh = tl.program_id(0) % num_kv_heads
    else:
        t = tl.program_id(0)
        kvh = tl.program_id(1)
    r_idx = tl.arange(0, R_PAD)
    ends = tl.load(qo_ptr + 1 + r_idx, mask=r_idx < num_requests, other=2147483647)
    r = tl.sum((ends <= t).to(tl.int32), axis=0)  # the request whose rows contain t
    q_end = tl.load(qo_ptr + r + 1)
    page_lo = tl.load(kvp_ptr + r)
    kv_len = (tl.load(kvp_ptr + r + 1) - page_lo - 1) * PAGE_SIZE + tl.load(last_ptr + r)
    q_pos = kv_len - (q_end - t)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(q_pos - sliding_window + 1, 0)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    d_ok = d[None, :] < HEAD_DIM
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=(g[:, None] < GROUP) & d_ok,
                other=0.0)
    qk_scale = scaling
    if KV_FP8:  # (Q @ (K8 * k_scale)^T * scaling = (Q @ K8^T) * (scaling * k_scale))
        qk_scale = scaling * tl.load(scale_ptr)
    if FP16_DOTS:  # Q in fp16, scaled by a power of two that keeps it in fp16's range (exact), unscaled in qk_scale
        q32 = q.to(tl.float32)
        q_max = tl.max(tl.max(tl.abs(q32), axis=1), axis=0)
        shift = tl.maximum(tl.ceil(tl.log2(tl.maximum(q_max, 1.0) / 16384.0)), 0.0)
        q = (q32 * tl.exp2(-shift)).to(tl.float16)
        qk_scale = qk_scale * tl.exp2(shift)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range((kv_start // BLOCK_N) * BLOCK_N, q_pos + 1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = (n <= q_pos) & (n >= kv_start)
        page = tl.load(kvi_ptr + page_lo + n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        base = page * stride_cp + (n % PAGE_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = valid[:, None] & d_ok
        # (KV_EVICTION "evict_first": K/V are read once; marked so, they leave L2 first, and a GEMM running beside
        # this kernel keeps more of its tiles there)
        k = tl.load(cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0, eviction_policy=KV_EVICTION)
        v = tl.load(cache_ptr + stride_ckv + base[:, None] + d[None, :], mask=kv_mask, other=0.0,
                    eviction_policy=KV_EVICTION)
        if KV_FP8:
            k = k.to(q.dtype)  # (e4m3 -> fp16: one conversion per pair of values; to bf16 it takes more)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh through exp (no libdevice needed)
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # P @ V. PV_PRECISION "ieee": fp32 FMAs; "tf32" (the default for half models): tensor cores with P in
        # fp32 (V exact, a bf16 value is a tf32 one; P rounded to 10 bits), as close to fp32 attention as the
        # reference; "half": P rounded to V's half type, as FlashAttention and FlashInfer do, so V feeds the MMA as
        # loaded (the tf32 path moves an fp32 copy of each V tile through shared memory, which limits the kernel
        # on SM partitions, where it is bound per SM; "half" pulls more bandwidth there: benchmarks/RESULTS.md).
        if PV_PRECISION == "half":
            if KV_FP8:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PV_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * tl.load(scale_ptr + 1)
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g[:, None] < GROUP) & d_ok)


def paged_attention_triton(
    q: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [P, 2, page, Hkv, D]
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    scaling: float,
    sliding_window: int,
    softcap: float,
    kv_scale: torch.Tensor | None = None,  # [2] fp32 (k_scale, v_scale) of an FP8 cache; None: 1.0
    **launch: Any,
) -> torch.Tensor:  # [T, H, D]
    """`launch` overrides `launch_config`'s choices (block_n, num_warps, num_stages, pv_precision, kv_eviction,
    heads_adjacent: benchmarks), and `dots="fp16"` (a bf16 query over an e4m3 cache, pv_precision "half"): both dots
    in fp16, the query scaled by a power of two into fp16's range (exact; unscaled in the softmax scale), K and V
    converted from e4m3 to fp16 (exact, and cheaper than to bf16), P rounded to fp16 (finer than bf16)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("paged_attention_triton needs the head dimension contiguous")
    out = torch.empty(num_tokens, num_heads, kv_cache.shape[-1], dtype=q.dtype, device=q.device)
    group = num_heads // num_kv_heads
    num_requests = kv_last_page_len.shape[0]
    config = {**launch_config(head_dim, q.dtype, kv_cache.dtype), **launch}
    fp8 = kv_quant.is_fp8(kv_cache.dtype)
    half = q.dtype if fp8 else kv_cache.dtype  # what P is rounded to with pv_precision="half"
    if config["pv_precision"] == "half" and half not in (torch.float16, torch.bfloat16):
        raise ValueError(f"pv_precision='half' rounds P to the cache's half type; this cache is {kv_cache.dtype}"
                         + (f" for a {q.dtype} query" if fp8 else ""))
    fp16_dots = config.get("dots") == "fp16"
    if fp16_dots and not (fp8 and q.dtype == torch.bfloat16 and config["pv_precision"] == "half"):
        raise ValueError("dots='fp16' is for a bf16 query over an e4m3 cache with pv_precision='half'")
    if fp8 and kv_scale is None:
        kv_scale = torch.ones(2, dtype=torch.float32, device=q.device)
    adjacent = bool(config.get("heads_adjacent", False))
    grid = (num_tokens * num_kv_heads,) if adjacent else (num_tokens, num_kv_heads)
    _paged_attention_kernel[grid](
        q, kv_cache, out, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
        kv_scale if fp8 else kv_last_page_len,  # (unread unless the cache is FP8)
        num_requests, num_kv_heads, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        scaling, softcap if softcap > 0 else 1.0, sliding_window,
        PAGE_SIZE=page_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=config["block_n"],
        R_PAD=max(16, triton.next_power_of_2(num_requests)), HAS_SOFTCAP=softcap > 0, HAS_WINDOW=sliding_window > 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PV_PRECISION=config["pv_precision"],
        KV_EVICTION=config["kv_eviction"], KV_FP8=fp8, FP16_DOTS=fp16_dots, HEADS_ADJACENT=adjacent,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def launch_config(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The kernel's tile and launch parameters for this head size, query dtype and KV-cache dtype (None: the same).

    P @ V on tensor cores (tf32) for half-precision models: with fp32 FMAs it was the kernel's bottleneck; on
    tensor cores the kernel reads the cache about as fast as FlashInfer's decode kernel on the whole GPU, and its
    outputs differ from fp32 FMAs' by no more than the half-precision output's own rounding. fp32 models keep
    "ieee" (the reference's precision). 64-token blocks (32 for heads wider than 128), 4 warps: the fastest block
    size and warp count probed (pipeline stages matter little; more stages, which keep more K/V tiles in flight,
    are no faster on partitions either). Evidence for these choices: benchmarks/RESULTS.md, measured by
    `python3 -m benchmarks.research.bench_attention_sms`. "half" (P rounded to the half type) is a launch option,
    not the default: the memory unit's decode rows may use it (`cost.measure.TRITON_DECODE_VARIANTS`).
    `kv_eviction` ("" or "evict_first"): the cache policy of the K/V loads, for the memory unit's kernel running
    beside GEMMs; off by default (`python3 -m benchmarks.research.probe_corun` found no gain from it:
    benchmarks/RESULTS.md). An e4m3 cache gets blocks of twice the tokens (128; 64 for heads wider than 128), so a
    tile holds as many bytes as a half cache's: faster than half-size tiles over e4m3 (`python3 -m
    benchmarks.bench_kv_dtype`, benchmarks/RESULTS.md; the wider heads' choice is by analogy), and P @ V in "half"
    for half models (V converted from e4m3 to the query's half type, exact, P rounded to it, as FlashInfer's e4m3
    kernels do): faster over e4m3 than the fp32 copy of V a tf32 MMA takes (`--sweep` of the same benchmark).
    `heads_adjacent`: the programs of one token's KV heads launched side by side (one grid row, head fastest), so
    the rows of a page that they read (a token's heads are adjacent in the cache) are read at about the same time,
    instead of one head's programs over every token first."""
    tokens = 64 if head_dim <= 128 else 32
    pv = "ieee" if dtype == torch.float32 else "tf32"
    if kv_dtype is not None and kv_quant.is_fp8(kv_dtype):
        tokens *= 2
        pv = "half" if dtype in (torch.float16, torch.bfloat16) else pv
    return dict(block_n=tokens, num_warps=4, num_stages=3, pv_precision=pv, kv_eviction="", heads_adjacent=False)


class TritonBackend(AttentionBackend):
    """The Triton kernel above: no host planning, no host sync, so it runs inside CUDA graphs."""

    name = "triton"
    kernel = staticmethod(paged_attention_triton)

    def unsupported_reason(self, configs: Sequence[AttentionConfig], dtype: torch.dtype,
                           device: torch.device, kv_dtype: torch.dtype | None = None) -> str:
        if dtype == torch.float64:
            return "the Triton kernel computes in fp32 at most (the model is float64)"
        if (kv_dtype is not None and kv_quant.is_fp8(kv_dtype) and device.type == "cuda"
                and torch.cuda.get_device_capability(device) < (8, 9)):
            return (f"Triton reads e4m3 (the FP8 KV cache) on compute capability 8.9 or newer (this GPU is "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
        return ""


register(TritonBackend())

"""Pure-torch paged attention: the reference every faster backend must match. Runs on CPU and GPU.

FP8 caches (`kv_quant`) are written quantised and read dequantised (value.float() * scale) before the fp32
arithmetic. Pages are indexed through a uint8 view: the same bytes, and indexing kernels that every torch version
has for uint8 (not all have them for float8 types).
"""

from __future__ import annotations

import torch

from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.backend import AttentionBackend, register

__all__ = ["write_kv_", "paged_attention_reference", "TorchBackend"]


def write_kv_(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              kv_scale: torch.Tensor | None = None) -> None:
    """Store this step's keys/values: token t goes to flat slot `slot_mapping[t]` of `kv_cache`.

    kv_cache: [P, 2, page, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T] int64. An FP8 cache stores
    `kv_quant.quantize(k, kv_scale[0])` and `quantize(v, kv_scale[1])` (kv_scale: [2] fp32; None: 1.0).
    """
    page_size = kv_cache.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    if kv_quant.is_fp8(kv_cache.dtype):
        k_scale, v_scale = (kv_scale[0], kv_scale[1]) if kv_scale is not None else (1.0, 1.0)
        pages = kv_cache.view(torch.uint8)
        pages[page, 0, offset] = kv_quant.quantize(k, k_scale, kv_cache.dtype).view(torch.uint8)
        pages[page, 1, offset] = kv_quant.quantize(v, v_scale, kv_cache.dtype).view(torch.uint8)
        return
    kv_cache[page, 0, offset] = k.to(kv_cache.dtype)
    kv_cache[page, 1, offset] = v.to(kv_cache.dtype)


def read_pages(kv_cache: torch.Tensor, pages: torch.Tensor, num_tokens: int, kv_scale: torch.Tensor | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [num_tokens, Hkv, D] in `dtype` of the tokens stored in `pages` (in order), dequantised
    where the cache is FP8."""
    if kv_quant.is_fp8(kv_cache.dtype):
        kv = kv_cache.view(torch.uint8)[pages].view(kv_cache.dtype)
    else:
        kv = kv_cache[pages]
    kv = kv.transpose(0, 1).flatten(1, 2)[:, :num_tokens]  # [2, L, Hkv, D]
    if not kv_quant.is_fp8(kv_cache.dtype):
        return kv[0].to(dtype), kv[1].to(dtype)
    k_scale, v_scale = (kv_scale[0], kv_scale[1]) if kv_scale is not None else (1.0, 1.0)
    return kv_quant.dequantize(kv[0], k_scale, dtype), kv_quant.dequantize(kv[1], v_scale, dtype)


def paged_attention_reference(
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
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each request's queries over its cached KV, one request at a time, in fp32 (fp64 for
    fp64 models); an FP8 cache's values are dequantised first."""
    out = torch.empty(q.shape[0], q.shape[1], kv_cache.shape[-1], dtype=q.dtype, device=q.device)
    qo, kvp, last = qo_indptr.tolist(), kv_indptr.tolist(), kv_last_page_len.tolist()
    page_size = kv_cache.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    for r in range(len(qo) - 1):
        if qo[r + 1] == qo[r]:
            continue
        pages = kv_indices[kvp[r] : kvp[r + 1]].long()
        kv_len = (len(pages) - 1) * page_size + last[r]
        k, v = read_pages(kv_cache, pages, kv_len, kv_scale, compute)
        out[qo[r] : qo[r + 1]] = _attend_one(q[qo[r] : qo[r + 1]], k, v, scaling, sliding_window, softcap)
    return out


def _attend_one(
    q: torch.Tensor,  # [Tq, H, D]
    k: torch.Tensor,  # [L, Hkv, D]
    v: torch.Tensor,  # [L, Hkv, D]
    scaling: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    num_q, num_kv = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.to(dtype).repeat_interleave(group, dim=1)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), k) * scaling  # [H, Tq, L]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(num_kv - num_q, num_kv, device=q.device)[:, None]
    k_pos = torch.arange(num_kv, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window > 0:  # HF semantics: a query sees the last `sliding_window` positions, itself included
        visible &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


class TorchBackend(AttentionBackend):
    """The reference kernel: any device and dtype; loops over requests on the host (reads the request table
    there), so its steps cannot be captured in a CUDA graph."""

    name = "torch"
    kernel = staticmethod(paged_attention_reference)

    def graph_blocker(self) -> str:
        return "the 'torch' attention backend reads the request table on the host (use 'triton' or 'flashinfer')"


register(TorchBackend())

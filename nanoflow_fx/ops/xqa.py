"""FlashInfer's XQA decode kernel over an FP8 cache (`NanoFlowConfig.fp8_attention`).

FlashInfer 0.3's decode kernels read e4m3 pages and compute in 16 bits (each value converted in the inner loop): at
the engine's decode shape that takes 0.65x the time of a bf16 cache, where the bytes allow 0.5x. XQA (FlashInfer >=
0.5, from TensorRT-LLM) on Hopper multiplies in FP8 instead (wgmma over e4m3: the query and the softmax
probabilities are rounded to e4m3 too) and reads the pages at the bandwidth a bf16 decode reaches: 0.51x
(benchmarks/RESULTS.md). Its cost is that rounding: attention computed from e4m3 q and P, not only e4m3 K/V.

XQA takes a dense page table [rows, width] and uint32 lengths where the steps carry CSR page lists, and one scale
pair for the layer: logits = q . k * k_scale * scaling (`bmm1`), out = sum p * v * v_scale (`bmm2`). `XqaTables`
holds the table for a decode batch (fixed buffers for a CUDA-graph bucket: the captured launch keeps reading them)
and fills it from the step's table before each step, on the device, from host row offsets (`fill`). Its width is
the longest sequence a request may hold (`max_seq_len` / page size): XQA's launch depends on the width only through
the table's stride.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.backend import AttentionConfig, ScaleValues

__all__ = ["XqaTables", "build", "run", "unavailable_reason"]

PAGE_SIZES = (16, 32, 64, 128)
# Semaphores (zeroed once; XQA leaves them zero) then the scratch of split sequences (partial rows of at most a few
# hundred (request, KV head) pairs: XQA splits a sequence only while batch x KV heads is below ~3 x the SMs).
_SEMAPHORE_BYTES = 8 * 2**20
_WORKSPACE_BYTES = _SEMAPHORE_BYTES + 56 * 2**20
_workspaces: dict[torch.device, torch.Tensor] = {}


def unavailable_reason(backend: str, configs: Sequence[AttentionConfig], page_size: int, device: torch.device,
                       kv_dtype: torch.dtype | None) -> str:
    """Why XQA cannot attend these layers' decode rows here, the step's attention on `backend` ("" if it can)."""
    if backend != "flashinfer":  # (XQA takes the decode rows of FlashInfer's planned steps)
        return f"the {backend!r} attention backend computes its decode rows itself; fp8_attention needs 'flashinfer'"
    if kv_dtype is None or not kv_quant.is_fp8(kv_dtype):
        return "it reads an FP8 KV cache: set kv_cache_dtype='fp8_e4m3'"
    if device.type != "cuda":
        return f"XQA runs on CUDA (the model is on {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"XQA's FP8 kernel is Hopper's (compute capability 9.x); this GPU is {major}.{minor}"
    if importlib.util.find_spec("flashinfer") is None or importlib.util.find_spec("flashinfer.xqa") is None:
        return "XQA comes with FlashInfer >= 0.5: pip install 'flashinfer-python>=0.5'"
    if page_size not in PAGE_SIZES:
        return f"XQA takes pages of {PAGE_SIZES} tokens (page_size={page_size})"
    for config in configs:
        if config.head_dim % 16 or not 16 <= config.head_dim <= 256:
            return f"XQA takes head dims of 16..256 in steps of 16 (the model has {config.head_dim})"
        if config.softcap > 0:
            return "XQA has no logit soft-capping (this model caps its attention logits)"
    return ""


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


class XqaTables:
    """A decode batch's XQA page table [rows, width] (int32, unused entries 0) and lengths (int32 storage, read as
    uint32) on the device. `fill` rewrites them in place for a step's first rows (a captured launch over `rows`
    reads these buffers; the rows past a step's are padding of an earlier step: never read by the step's rows)."""

    def __init__(self, rows: int, width: int, page_size: int, device: torch.device) -> None:
        self.rows, self.width, self.page_size = rows, width, page_size
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)
        self.columns = torch.arange(width, dtype=torch.int32, device=device)

    def fill(self, kv_ptr: torch.Tensor, last: torch.Tensor, kv_indices: torch.Tensor) -> None:
        """From the CSR table's first rows: `kv_ptr` [n + 1] and `last` [n] on the host (pinned: the copy does not
        wait), `kv_indices` on the device. Request r's pages kv_indices[kv_ptr[r]:kv_ptr[r + 1]] fill row r."""
        n = last.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} decode rows for XQA tables of {self.rows}")
        starts, counts = kv_ptr[:n], kv_ptr[1:n + 1] - kv_ptr[:n]
        if n and int(counts.max()) > self.width:
            raise ValueError(f"a request of {int(counts.max())} pages is longer than XQA's table ({self.width} pages: "
                             f"max_seq_len {self.width * self.page_size})")
        host = torch.stack([starts, counts, ((counts - 1) * self.page_size + last).clamp_(min=0)]).to(torch.int32)
        if self.table.device.type == "cuda":
            host = host.pin_memory()
        starts_d, counts_d, lengths_d = host.to(self.table.device, non_blocking=True)
        self.lengths[:n].copy_(lengths_d)
        index = (starts_d[:, None] + self.columns[None, :]).clamp_(max=max(kv_indices.shape[0] - 1, 0))
        pages = kv_indices[index] if kv_indices.numel() else torch.zeros_like(index)
        self.table[:n] = torch.where(self.columns[None, :] < counts_d[:, None], pages, 0)


def build(configs: Sequence[AttentionConfig], query_dtype: torch.dtype, kv_dtype: torch.dtype, page_size: int) -> None:
    """Build (FlashInfer's JIT, on a fresh machine) and load XQA's module for each configuration."""
    from flashinfer.xqa import get_xqa_module

    for config in dict.fromkeys(configs):
        get_xqa_module(query_dtype, kv_dtype, page_size, config.head_dim, config.num_qo_heads // config.num_kv_heads,
                       config.sliding_window > 0, query_dtype)


def run(tables: XqaTables, config: AttentionConfig, q: torch.Tensor, kv_cache: torch.Tensor,
        kv_scale: torch.Tensor | None, out: torch.Tensor | None = None,
        scale_values: ScaleValues | None = None) -> torch.Tensor:
    """Decode attention of q's rows (one token each: the first rows of `tables`) over the cache: the scales as host
    floats where `scale_values` has them (a CUDA graph freezes them, as FlashInfer's own decode takes them), else
    the device tensors (read at each launch)."""
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    values = scale_values(kv_scale) if scale_values is not None and kv_scale is not None else None
    bmm1: Any
    bmm2: Any
    if kv_scale is None:
        bmm1, bmm2 = config.scaling, 1.0
    elif values is not None:
        bmm1, bmm2 = values[0] * config.scaling, values[1]
    else:
        bmm1, bmm2 = kv_scale[:1] * config.scaling, kv_scale[1:]
    rows = q.shape[0]
    return xqa_batch_decode_with_kv_cache(
        q, kv_cache, _workspace(q.device), tables.table[:rows], tables.lengths[:rows].view(torch.uint32),
        tables.width * tables.page_size, bmm1_scale=bmm1, bmm2_scale=bmm2,
        window_left=config.sliding_window - 1 if config.sliding_window > 0 else -1, out=out, enable_pdl=False)

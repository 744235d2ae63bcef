"""FlashInfer paged attention (optional dependency): planned on the host once per step, run by the captured op.

FlashInfer splits a step's work on the host (`plan`, from the request table) and runs kernels that read that
split from device buffers. `FlashInferPlanner` owns one `BatchPrefillWithPagedKVCacheWrapper` per distinct
attention configuration of the model (heads, head dim, scale, window, soft-cap: Gemma-2 has two), plans them
all before a step, and makes them the active plans that `nanoflow::paged_attention(backend="flashinfer")` runs.
Eager steps use the prefill wrapper (any mix: decode tokens are 1-row requests, prefill chunks attend
causally to their cached prefix). CUDA graphs are captured for pure decode steps only, with decode wrappers
of fixed batch and buffers (`use_cuda_graph`): FlashInfer sizes a captured launch by the plan it was captured
with, and a decode bucket's plans all have the same shape (bucket-many one-token requests), so the graph stays
valid when it is re-planned (outside the graph) before each replay.
Our cache layout [pages, 2, page_size, kv_heads, head_dim] is FlashInfer's NHD layout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow_fx.ops.metadata import AttentionMetadata

__all__ = ["AttentionConfig", "FlashInferPlanner", "available", "run_planned", "unsupported_reason"]

# FlashInfer's split work (merge buffers of split-KV) lives here; one per device, shared by all wrappers,
# which run one after another on one stream.
_FLOAT_WORKSPACE_BYTES = 256 * 2**20
_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class AttentionConfig:
    """What a FlashInfer plan depends on besides the request table (one per distinct layer configuration)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int  # <= 0: none
    softcap: float  # <= 0: none


# The planned wrapper of each configuration, for the step being run or captured (set by `activate`).
_ACTIVE: dict[AttentionConfig, Any] = {}
_float_workspaces: dict[torch.device, torch.Tensor] = {}


def available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def unsupported_reason(configs: Sequence[AttentionConfig], dtype: torch.dtype, device: torch.device) -> str:
    """Why FlashInfer cannot serve these layers ("" if it can)."""
    if not available():
        return "flashinfer is not installed (pip install flashinfer-python)"
    if device.type != "cuda":
        return f"FlashInfer runs on CUDA (the model is on {device})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashInfer kernels take fp16/bf16 (the model is {dtype})"
    for config in configs:
        if config.head_dim not in _HEAD_DIMS:
            return f"FlashInfer's kernels take head_dim in {_HEAD_DIMS} (the model has {config.head_dim})"
        if config.num_qo_heads % config.num_kv_heads:
            return f"{config.num_qo_heads} query heads are not a multiple of {config.num_kv_heads} KV heads"
    return ""


class FlashInferPlanner:
    """The FlashInfer wrappers of all eager steps (prefill wrappers: any mix of query lengths), or of one
    CUDA-graph decode bucket (decode wrappers with fixed buffers: `decode_batch` one-token requests)."""

    def __init__(
        self,
        configs: Sequence[AttentionConfig],
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        decode_batch: int | None = None,
        max_pages: int = 0,
    ) -> None:
        """With `decode_batch` (and `max_pages`, the bucket's page-list length) the planner serves a captured
        decode graph: every step it plans has exactly `decode_batch` requests of one query token each, so the
        launch FlashInfer captured (its grid is sized by the batch) stays valid when re-planned."""
        import flashinfer

        self.page_size, self.dtype, self.decode = page_size, dtype, decode_batch is not None
        self._planned: torch.cuda.Event | None = None  # when the last plan's host-to-device copies have run
        if device not in _float_workspaces:
            _float_workspaces[device] = torch.empty(_FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        workspace = _float_workspaces[device]
        self.wrappers: dict[AttentionConfig, Any] = {}
        for config in dict.fromkeys(configs):
            if decode_batch is None:
                wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
            else:
                int32 = dict(dtype=torch.int32, device=device)
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_cuda_graph=True,
                    # Grouped-query heads (>= 4 per KV head) run on tensor cores (FlashInfer's advice), through
                    # the same JIT module as prefill, so no second kernel family is built.
                    use_tensor_cores=config.num_qo_heads // config.num_kv_heads >= 4,
                    paged_kv_indptr_buffer=torch.zeros(decode_batch + 1, **int32),
                    paged_kv_indices_buffer=torch.zeros(max_pages, **int32),
                    paged_kv_last_page_len_buffer=torch.zeros(decode_batch, **int32),
                )
            self.wrappers[config] = wrapper

    def plan(self, host: AttentionMetadata, kv_indices: torch.Tensor) -> None:
        """Plan every configuration for this step and make the plans the active ones.

        `host` holds the step's metadata in pinned host memory (FlashInfer's planner reads it there; nothing
        waits for the GPU); `kv_indices` is the page list already on the device (copied device to device).
        """
        # FlashInfer writes each plan into the wrapper's pinned buffer and copies it to the device
        # asynchronously; the host may run a step ahead, so wait until the previous plan's copy has run.
        if self._planned is not None:
            self._planned.synchronize()
        qo, kv_ptr, _, last, _ = host.tensors()
        seq_lens = ((kv_ptr[1:] - kv_ptr[:-1] - 1) * self.page_size + last).clamp_(min=0)
        if qo.is_pinned():
            seq_lens = seq_lens.pin_memory()
        for config, wrapper in self.wrappers.items():
            common = dict(
                window_left=config.sliding_window - 1 if config.sliding_window > 0 else -1,
                logits_soft_cap=config.softcap if config.softcap > 0 else None, sm_scale=config.scaling,
                q_data_type=self.dtype, kv_data_type=self.dtype, non_blocking=True, seq_lens=seq_lens,
            )
            heads = (config.num_qo_heads, config.num_kv_heads, config.head_dim, self.page_size)
            if self.decode:  # queries are one token per request: qo_indptr is implied
                wrapper.plan(kv_ptr, kv_indices, last, *heads, **common)
            else:
                wrapper.plan(qo, kv_ptr, kv_indices, last, *heads, causal=True, **common)
        self._planned = torch.cuda.Event()
        self._planned.record()
        _ACTIVE.update(self.wrappers)


def run_planned(q: torch.Tensor, kv_cache: torch.Tensor, scaling: float, sliding_window: int, softcap: float
                ) -> torch.Tensor:
    """Attention of q [T, H, D] over `kv_cache` with the active plan of this layer's configuration."""
    config = AttentionConfig(q.shape[1], kv_cache.shape[3], q.shape[2], float(scaling), int(sliding_window),
                             float(softcap))
    wrapper = _ACTIVE.get(config)
    if wrapper is None:
        raise RuntimeError(f"no FlashInfer plan is active for {config}: the engine plans every step before it runs "
                           "(the 'flashinfer' backend runs only inside StepEngine)")
    return wrapper.run(q, kv_cache)

"""`nanoflow::paged_attention`: the one operator attention is captured into.

It owns the step's only mutation: it writes the new keys/values into the paged KV cache in place
(`mutates_args`), then attends. Because the op declares the mutation itself, the captured ATen graph keeps
the write in place instead of copying the whole cache every step (functionalisation would).
"""

from __future__ import annotations

import torch

from nanoflow_fx.ops.backend import resolve
from nanoflow_fx.ops.kv_write import write_kv

__all__ = ["paged_attention"]


@torch.library.custom_op("nanoflow::paged_attention", mutates_args=("kv_cache",))
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    slot_mapping: torch.Tensor,
    scaling: float,
    sliding_window: int,
    softcap: float,
    backend: str = "torch",
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write k/v ([T, Hkv, D]) to their slots, then attend q ([T, H, D]) causally per request -> [T, H, D].

    `sliding_window` <= 0 means no window; `softcap` <= 0 means no logit soft-capping. `backend` names the
    kernel (`nanoflow_fx.ops.backend`): "torch" (the reference, any device), "triton" (CUDA, or Triton's
    interpreter on the CPU) or "flashinfer" (CUDA; runs the plan made on the host for this step, which the step
    context carries); the step context may name another backend standing in for it (`nanoflow_fx.context`).
    `kv_scale` ([2] fp32: k_scale, v_scale) comes with an FP8 cache (`nanoflow_fx.ops.kv_quant`): k/v are stored
    divided by it, and read multiplied by it. A graph input, not a constant: calibration may set it after capture,
    and replicated layers stay alike.
    """
    write_kv(kv_cache, k, v, slot_mapping, kv_scale)
    return resolve(backend).run(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, scaling,
                                sliding_window, softcap, kv_scale)


@paged_attention.register_fake
def _(q, k, v, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, slot_mapping, scaling, sliding_window, softcap, backend="torch", kv_scale=None):  # noqa: E501
    # Tie every per-token input to the query's token count, so a captured graph has one token-count symbol
    # (the split pass finds the token dimension of `slot_mapping`, k and v by it).
    torch._check(k.shape[0] == q.shape[0])
    torch._check(v.shape[0] == q.shape[0])
    torch._check(slot_mapping.shape[0] == q.shape[0])
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])

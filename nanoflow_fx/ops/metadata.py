"""Attention metadata of one token-packed step (FlashInfer's paged, CSR layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionMetadata", "pad_request_table"]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each request's queries and cached keys/values are, for one step.

    The step's tokens are packed: request r owns query rows `qo_indptr[r]:qo_indptr[r+1]`. Its KV (the cached
    prefix plus this step's tokens, already counted) lives in pages `kv_indices[kv_indptr[r]:kv_indptr[r+1]]`,
    the last of which holds `kv_last_page_len[r]` tokens. Token t's new K/V goes to flat slot
    `slot_mapping[t]` = page * page_size + offset. Queries are the last tokens of their request, so the query at
    row j of request r sits at position kv_len[r] - q_len[r] + j and attends causally.
    """

    qo_indptr: torch.Tensor  # [R + 1] int32
    kv_indptr: torch.Tensor  # [R + 1] int32
    kv_indices: torch.Tensor  # [num_used_pages] int32
    kv_last_page_len: torch.Tensor  # [R] int32
    slot_mapping: torch.Tensor  # [T] int64
    kv_caches: tuple[torch.Tensor, ...]  # per layer [num_pages, 2, page_size, num_kv_heads, head_dim]
    backend: str = "torch"  # the attention kernel (a constant of the captured graph)
    kv_scales: tuple[torch.Tensor, ...] = ()  # per layer [2] fp32 (k_scale, v_scale) of an FP8 cache; () otherwise

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-step index tensors, in field order (the caches excluded)."""
        return (self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_last_page_len, self.slot_mapping)


def pad_request_table(
    qo_indptr: list[int], kv_indptr: list[int], kv_indices: list[int], kv_last_page_len: list[int],
    page_size: int, requests: int, pages: int, pad_pages: bool = True,
) -> None:
    """Pad a request table (host lists, in place) to fixed sizes, as a CUDA graph's static inputs need: empty
    requests (no queries, no pages) up to `requests`, unused page ids up to `pages` (with `pad_pages`; else the
    page list keeps its length, at most `pages`: it fills the front of a static buffer whose tail no request
    reads)."""
    missing = requests - len(kv_last_page_len)
    if missing < 0 or len(kv_indices) > pages:
        raise ValueError(f"a table of {len(kv_last_page_len)} requests / {len(kv_indices)} pages does not fit "
                         f"{requests} requests / {pages} pages")
    qo_indptr += [qo_indptr[-1]] * missing
    kv_indptr += [kv_indptr[-1]] * missing
    kv_last_page_len += [page_size] * missing
    if pad_pages:
        kv_indices += [0] * (pages - len(kv_indices))

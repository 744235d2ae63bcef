"""Paged KV cache: per-layer page tensors and the allocator that hands pages to requests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoflow_fx.errors import KVCacheExhaustedError
from nanoflow_fx.ops.backend import AttentionConfig

__all__ = ["PageAllocator", "PagedKVCache", "page_bytes"]


class PageAllocator:
    """Free list of page ids 0..num_pages-1. Allocation is all-or-nothing."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVCacheExhaustedError(
                f"the KV cache needs {count} pages but only {len(self._free)} of {self.num_pages} are free "
                f"({count - len(self._free)} more than it has); raise NanoFlowConfig.num_pages (or "
                "kv_cache_memory_fraction), or use fewer or shorter requests"
            )
        return [self._free.pop() for _ in range(count)]

    def free(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))


def page_bytes(layers: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * page_size * spec.num_kv_heads * spec.head_dim * itemsize for spec in layers)


class PagedKVCache:
    """One [num_pages + 1, 2, page_size, num_kv_heads, head_dim] tensor per layer (FlashInfer's NHD layout).

    `layers[i]` is layer i's attention configuration. Pages 0..num_pages-1 belong to the allocator; the last
    one, `scratch_page`, takes the padding tokens' writes.
    """

    def __init__(
        self,
        layers: Sequence[AttentionConfig],
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.scratch_page = num_pages
        self.caches = tuple(
            torch.zeros(num_pages + 1, 2, page_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
            for spec in layers
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0].dtype

    @property
    def device(self) -> torch.device:
        return self.caches[0].device

    @property
    def num_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def read(self, layer: int, pages: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [num_tokens, Hkv, D] of a request whose KV lives in `pages`."""
        idx = torch.tensor(list(pages), dtype=torch.long, device=self.caches[layer].device)
        kv = self.caches[layer][idx].transpose(0, 1).flatten(1, 2)[:, :num_tokens]
        return kv[0], kv[1]

"""Per-nano-batch attention metadata: a pure function of the step's page table and the split boundaries."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoflow_fx.ops.metadata import pad_request_table

__all__ = ["split_attention_metadata"]


def split_attention_metadata(
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    page_size: int,
    boundaries: tuple[int, ...],
    pad: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    pin: bool = False,
    pad_pages: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(qo_indptr, kv_indptr, kv_indices, kv_last_page_len) of each nano-batch [b[i], b[i+1]) of the step.

    A request whose query rows straddle a boundary is cut there: its part in nano-batch i keeps the queries
    in [b[i], b[i+1]) and sees its KV up to its own last query, so causality and positions are unchanged.
    (Its later part reads KV the earlier part's attention wrote: those attention copies must run in order.)
    With `pad` = (requests, pages) every nano-batch's table is padded to those fixed sizes (empty requests, unused
    page ids), as a CUDA graph's static inputs need; a list of such pairs gives each nano-batch its own sizes;
    `pad_pages=False` pads the requests only (see `pad_request_table`). Reads its inputs on the host: give host
    tensors on the hot path (device tensors cost a sync each). `pin` builds host results in pinned memory (for
    non-blocking copies).
    """
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    pages, last = kv_indices.tolist(), kv_last_page_len.tolist()
    kv_len = [(kvp[r + 1] - kvp[r] - 1) * page_size + last[r] for r in range(len(last))]
    device = qo_indptr.device
    pin = pin and device.type == "cpu"  # only host memory is pinned
    pads: list[tuple[int, int] | None]
    if pad is None or (len(pad) == 2 and isinstance(pad[0], int)):
        pads = [pad] * (len(boundaries) - 1)  # type: ignore[list-item]  # (one pair for every nano-batch)
    else:
        pads = list(pad)  # type: ignore[arg-type]
        if len(pads) != len(boundaries) - 1:
            raise ValueError(f"{len(pads)} pads for {len(boundaries) - 1} nano-batches")
    result = []
    for (start, end), sizes in zip(zip(boundaries[:-1], boundaries[1:]), pads):
        n_qo, n_kvp, n_idx, n_last = [0], [0], [], []
        for r in range(len(last)):
            lo, hi = max(qo[r], start), min(qo[r + 1], end)
            if lo >= hi:
                continue
            seen = kv_len[r] - (qo[r + 1] - hi)  # KV up to this part's last query
            num_pages = -(-seen // page_size)
            n_qo.append(n_qo[-1] + hi - lo)
            n_idx += pages[kvp[r] : kvp[r] + num_pages]
            n_kvp.append(len(n_idx))
            n_last.append(seen - (num_pages - 1) * page_size)
        if sizes is not None:
            pad_request_table(n_qo, n_kvp, n_idx, n_last, page_size, *sizes, pad_pages=pad_pages)
        result.append(tuple(torch.tensor(v, dtype=torch.int32, device=device, pin_memory=pin)
                            for v in (n_qo, n_kvp, n_idx, n_last)))
    return result  # type: ignore[return-value]

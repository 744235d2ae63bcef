"""Requests and the token-packed step built from them (pure functions of the request table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanoflow_fx.ops import AttentionMetadata

__all__ = ["Request", "Chunk", "StepInputs", "build_step"]


@dataclass
class Request:
    """One sequence: its prompt, the tokens generated so far, and the pages holding its KV."""

    prompt: list[int]
    max_new_tokens: int
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    output: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (prompt remainder, or the last sampled token)."""
        return len(self.prompt) + len(self.output) - self.num_cached


@dataclass(frozen=True)
class Chunk:
    """`num_tokens` consecutive uncached tokens of `request`, from position `start`, run in one step.

    `start` and `completes` are fixed when the chunk is made, before the step advances the request.
    """

    request: Request
    num_tokens: int
    start: int = field(init=False)
    completes: bool = field(init=False)  # reaches the last known token, so its logits give the next token

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", self.request.num_cached)
        object.__setattr__(self, "completes", self.num_tokens == self.request.num_pending)


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [N] int64: rows whose logits are needed
    metadata: AttentionMetadata


def build_step(
    chunks: Sequence[Chunk],
    kv_caches: tuple[torch.Tensor, ...],
    page_size: int,
    device: torch.device,
    all_logits: bool = False,
) -> StepInputs:
    """Pack the chunks' tokens into one step. Requests' pages must already cover their new tokens.

    Logits are kept for the last token of each completing chunk (or every token with `all_logits`).
    """
    ids: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    qo, kv_ptr, kv_idx, last_len = [0], [0], [], []
    for chunk in chunks:
        req, start = chunk.request, chunk.start
        end = start + chunk.num_tokens
        if chunk.num_tokens < 1 or end > len(req.tokens) or start != req.num_cached:
            raise ValueError(f"chunk [{start}, {end}) does not follow the {req.num_cached} cached tokens of a "
                             f"request of {len(req.tokens)} tokens")
        num_pages = -(-end // page_size)
        if num_pages > len(req.pages):
            raise ValueError(f"request holds {len(req.pages)} pages but needs {num_pages} for {end} tokens")
        ids += req.tokens[start:end]
        slots += [req.pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
        if all_logits:
            logits_rows += range(len(ids) - chunk.num_tokens, len(ids))
        elif chunk.completes:
            logits_rows.append(len(ids) - 1)
        qo.append(len(ids))
        kv_idx += req.pages[:num_pages]
        kv_ptr.append(len(kv_idx))
        last_len.append(end - (num_pages - 1) * page_size)
    positions = [p for c in chunks for p in range(c.start, c.start + c.num_tokens)]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    metadata = AttentionMetadata(
        qo_indptr=i32(qo),
        kv_indptr=i32(kv_ptr),
        kv_indices=i32(kv_idx),
        kv_last_page_len=i32(last_len),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        kv_caches=kv_caches,
    )
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        position_ids=torch.tensor(positions, dtype=torch.int64, device=device),
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=device),
        metadata=metadata,
    )

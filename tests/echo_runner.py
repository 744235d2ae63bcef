"""A stand-in for `StepRunner` under a real `Engine`, so that the engine's bookkeeping can be tested without a model.

The "echo model" is causal and reads its context only from the paged KV cache, as a real model does: each step's
tokens are written into their requests' pages (the token id as the key) at the slots `batch.build_step` maps
them to, and each completing chunk's next token is a hash of every token its request's
pages hold up to that position (`next_token`). So what a request generates alone is known without running the
engine (`echo_continuation`), and a page shared by two requests, freed while in use, or written at the wrong
place changes the tokens. PENDING inputs (tokens not yet read back) are fed from the slot table that
`record_tokens` fills, as on the device (`batch.feed_pending`).

`Engine` uses of its runner: `kv_cache` (allocator, page size), `num_slots`, `step_fn.model` (the vocabulary size),
`run(chunks)` (logits of the completing chunks, in order) and `record_tokens(slots, tokens)`.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

from nanoflow_fx.runtime import Chunk, PagedKVCache
from nanoflow_fx.runtime import engine as engine_module
from nanoflow_fx.runtime.batch import build_step, feed_pending
from nanoflow_fx.runtime.requests import PENDING
from tests.tiny_models import VOCAB

UNWRITTEN = -2  # what a page slot holds before any token is written there


def next_token(context: Sequence[int], vocab: int = VOCAB) -> int:
    """The echo model's greedy next token after `context`: a hash of all of it."""
    digest = hashlib.blake2b(struct.pack(f"<{len(context)}q", *context), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab


def echo_continuation(prompt: Sequence[int], max_new_tokens: int, eos: int | None = None) -> tuple[int, ...]:
    """What the echo model generates greedily after `prompt` alone: up to `max_new_tokens`, up to and including
    the first `eos`."""
    context, new = list(prompt), []
    while len(new) < max_new_tokens:
        new.append(next_token(context))
        context.append(new[-1])
        if new[-1] == eos:
            break
    return tuple(new)


@dataclass(frozen=True)
class ChunkRecord:
    """What a test may ask of a chunk once it ran: did it cut a prompt, did it carry a PENDING input."""

    prompt_len: int
    start: int
    num_tokens: int
    pending: bool  # one of its input tokens was PENDING (fed from the slot table)

    @classmethod
    def of(cls, chunk: Chunk) -> ChunkRecord:
        req, end = chunk.request, chunk.start + chunk.num_tokens
        return cls(len(req.prompt), chunk.start, chunk.num_tokens, PENDING in req.token_slice(chunk.start, end))

    @property
    def cuts_prompt(self) -> bool:
        return self.start == 0 and self.num_tokens < self.prompt_len


class _Vocabulary(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed


class EchoRunner:
    """Runs steps of the echo model over a paged cache of `num_pages` pages of `page_size` tokens, with
    `num_slots` request slots (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int, num_slots: int, vocab: int = VOCAB) -> None:
        layer = SimpleNamespace(num_kv_heads=1, head_dim=1)
        self.kv_cache = PagedKVCache([layer], num_pages, page_size, torch.int64, torch.device("cpu"))
        self.kv_cache.caches[0].fill_(UNWRITTEN)
        self.step_fn = SimpleNamespace(model=_Vocabulary(vocab))
        self.vocab = vocab
        self.last_tokens = torch.full((num_slots,), UNWRITTEN, dtype=torch.int64)
        self.chunks: list[ChunkRecord] = []  # every chunk run

    @property
    def num_slots(self) -> int:
        return self.last_tokens.shape[0]

    def run(self, chunks: Sequence[Chunk], all_logits: bool = False) -> torch.Tensor:
        cache = self.kv_cache
        inputs = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, cache.device, all_logits)
        self.chunks += [ChunkRecord.of(c) for c in chunks]
        ids = feed_pending(inputs.input_ids, inputs.feed_slots, self.last_tokens)
        meta = inputs.metadata
        slots = meta.slot_mapping
        keys = cache.caches[0][:, 0, :, 0, 0]  # [page, offset], a view
        keys[slots // cache.page_size, slots % cache.page_size] = ids
        rows = inputs.logits_indices[: inputs.num_logits].tolist()
        logits = torch.zeros(len(rows), self.vocab)
        for i, row in enumerate(rows):
            request = int(torch.searchsorted(meta.qo_indptr, row, right=True)) - 1
            table = meta.kv_indices[meta.kv_indptr[request] : meta.kv_indptr[request + 1]].tolist()
            context, _ = cache.read(0, table, int(inputs.position_ids[row]) + 1)
            logits[i, next_token(context.flatten().tolist(), self.vocab)] = 1.0
        return logits

    def record_tokens(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        if slots:
            self.last_tokens[torch.tensor(list(slots))] = tokens.to(torch.int64)


def late_readbacks(polls: Sequence[int]) -> Any:
    """Patch the engine so that its sampled tokens arrive late, as from a device: readback i reports ready only
    at its `polls[i % len(polls)]`-th poll (0: at once, as on the CPU), so the engine runs up to `MAX_LAG` steps
    ahead of the tokens it knows (PENDING inputs, EOS found after more steps ran)."""
    count = itertools.count()

    class LateReadback(engine_module._Readback):
        def __init__(self, tokens: torch.Tensor, targets: list) -> None:  # type: ignore[type-arg]
            super().__init__(tokens, targets)
            self.polls_left = polls[next(count) % len(polls)]

        def ready(self) -> bool:
            if self.polls_left > 0:
                self.polls_left -= 1
                return False
            return True

    return mock.patch.object(engine_module, "_Readback", LateReadback)

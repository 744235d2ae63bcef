"""The token-packed step built from a step's chunks (pure functions of the request table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nanoflow_fx.ops import AttentionMetadata
from nanoflow_fx.ops.metadata import pad_request_table
from nanoflow_fx.runtime.requests import PENDING, Request

__all__ = ["Chunk", "HostStaging", "StepInputs", "StepShape", "build_step", "feed_pending", "to_device"]


@dataclass(frozen=True)
class Chunk:
    """`num_tokens` consecutive uncached tokens of `request`, from position `start`, run in one step.

    `start` and `completes` are fixed when the chunk is made, before the step advances the request: `start` is
    the request's `num_cached` unless given (a newly admitted request whose first pages the prefix cache holds
    starts past them: the engine sets `num_cached` to that start before the step runs).
    """

    request: Request
    num_tokens: int
    start: int = -1
    completes: bool = field(init=False)  # reaches the last known token, so its logits give the next token

    def __post_init__(self) -> None:
        if self.start < 0:
            object.__setattr__(self, "start", self.request.num_cached)
        object.__setattr__(self, "completes", self.start + self.num_tokens == self.request.num_tokens)


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    feed_slots: torch.Tensor  # [T] int64: the request slot of each token (read where input_ids is PENDING)
    logits_indices: torch.Tensor  # [N] int64: rows whose logits are computed
    num_logits: int  # the first `num_logits` rows of the output are real; the rest are padding
    metadata: AttentionMetadata

    def to(self, device: torch.device) -> StepInputs:
        """These inputs on `device` (from pinned host tensors the copies do not block the host)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        meta = self.metadata
        metadata = AttentionMetadata(move(meta.qo_indptr), move(meta.kv_indptr), move(meta.kv_indices),
                                     move(meta.kv_last_page_len), move(meta.slot_mapping), kv_caches=meta.kv_caches,
                                     backend=meta.backend, kv_scales=meta.kv_scales)
        return StepInputs(move(self.input_ids), move(self.position_ids), move(self.feed_slots),
                          move(self.logits_indices), self.num_logits, metadata)


@dataclass(frozen=True)
class StepShape:
    """Fixed sizes a step is padded to, so that one captured CUDA graph serves every step of its bucket."""

    tokens: int
    requests: int  # including the one-token padding requests
    pages: int
    logits: int


@dataclass
class _Packed:
    """Growing host-side lists of one step; `add` appends one request's chunk."""

    page_size: int
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)
    qo: list[int] = field(default_factory=lambda: [0])
    kv_ptr: list[int] = field(default_factory=lambda: [0])
    kv_idx: list[int] = field(default_factory=list)
    last_len: list[int] = field(default_factory=list)

    def add(self, tokens: Sequence[int], start: int, pages: Sequence[int], slot: int = 0) -> None:
        """Tokens at positions start.. of a request whose KV lives in `pages` (all cached before `start`)."""
        end = start + len(tokens)
        num_pages = -(-end // self.page_size)
        self.ids += tokens
        self.feed += [slot] * len(tokens)
        self.positions += range(start, end)
        self.slots += [pages[p // self.page_size] * self.page_size + p % self.page_size for p in range(start, end)]
        self.qo.append(len(self.ids))
        self.kv_idx += pages[:num_pages]
        self.kv_ptr.append(len(self.kv_idx))
        self.last_len.append(end - (num_pages - 1) * self.page_size)


class HostStaging:
    """Reused host buffers a step's integer inputs are packed into, one after another, for one copy to the device.

    A pinned tensor made per input per step (`torch.tensor(values, pin_memory=True)`, 9 per step) costs the host
    far more than writing into memory pinned once, enough to make small-batch decode steps wait on the host
    (benchmarks/RESULTS.md, "where generate()'s decode step goes"). Here each step writes its values (through
    numpy) into one buffer of a ring of `depth`; a buffer is written again only once the device has run the copies
    queued from it (an event recorded when the next step is packed, by which time every copy from it has been
    queued). Pinned when CUDA is there.
    """

    def __init__(self, depth: int = 4, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0
        self._last: int | None = None

    def pack(self, fields: Sequence[tuple[Sequence[int], torch.dtype]]) -> list[torch.Tensor]:
        """Each (values, dtype) as a 1-D host tensor: views of one buffer, valid until `depth` more packs."""
        if self._last is not None and self.pin:
            self._events[self._last] = event = torch.cuda.Event()
            event.record()
        slot = self._next
        pending = self._events[slot]
        if pending is not None:
            pending.synchronize()  # (the ring is deeper than the host ever runs ahead: no wait)
        sizes = [len(values) * dtype.itemsize for values, dtype in fields]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // 8) * 8)  # every view 8-byte aligned
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < offsets[-1]:
            buffer = torch.empty(max(offsets[-1], 2 * (buffer.numel() if buffer is not None else 4096)),
                                 dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[slot] = buffer
        raw = buffer.numpy()
        views = []
        for (values, dtype), start, size in zip(fields, offsets, sizes):
            view = buffer[start : start + size].view(dtype)
            raw[start : start + size].view(_NUMPY[dtype])[:] = values
            views.append(view)
        self._last, self._next = slot, (slot + 1) % len(self._buffers)
        return views


_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_}


def build_step(
    chunks: Sequence[Chunk],
    kv_caches: tuple[torch.Tensor, ...],
    page_size: int,
    scratch_page: int,
    device: torch.device,
    all_logits: bool = False,
    min_tokens: int = 2,
    backend: str = "torch",
    shape: StepShape | None = None,
    pin: bool = False,
    staging: HostStaging | None = None,
    pad_pages: bool = True,
    kv_scales: tuple[torch.Tensor, ...] = (),
) -> StepInputs:
    """Pack the chunks' tokens into one step. Requests' pages must already cover their new tokens. `kv_caches` and
    `kv_scales` (an FP8 cache's: `PagedKVCache.scales`) go into the step's metadata as they are.

    Logits are kept for the last token of each completing chunk (or every token with `all_logits`).
    Padding tokens close every step: each is a one-token request at position 0 (valid for any position
    embedding) whose KV goes to `scratch_page`, never read by a real request (padding tokens may overwrite each
    other's slot there; only padding rows, which are discarded, read it). They pad the step to `min_tokens`, so
    every step size stays >= 2 and the captured graph never specialises on sizes 0 or 1. With `shape` (a
    CUDA-graph bucket) they fill the step up to `shape.tokens` (none when nothing is missing), and the request
    table, page list and logits rows are padded with empty entries to their fixed sizes. Because each padding
    token is a request of its own, a step of decodes stays a step of one-token requests, and a bucket of T
    tokens never needs more than T requests or (allocator pages + T) page ids. Tensors for a CUDA device travel
    from pinned host memory without blocking the host; `pin` pins CPU results (the source of a later
    non-blocking copy). With `staging` (the step runner's, on CUDA) the host results are views of its reused
    buffers instead (valid until it has packed `depth` more steps: copy them to the device at once).
    `pad_pages=False` leaves the page list unpadded (its real length, at most `shape.pages`): a CUDA-graph replay
    copies it into the front of the graph's page buffer (a bucket's buffer holds every page of the cache, so
    padding it would pack and copy tens of thousands of unused ids every step); the request table still says
    which entries each request reads, so the buffer's tail is never read.
    """
    packed = _Packed(page_size)
    logits_rows: list[int] = []
    for chunk in chunks:
        req, start, end = chunk.request, chunk.start, chunk.start + chunk.num_tokens
        if chunk.num_tokens < 1 or end > req.num_tokens or start != req.num_cached:
            raise ValueError(f"chunk [{start}, {end}) does not follow the {req.num_cached} cached tokens of a "
                             f"request of {req.num_tokens} tokens")
        if -(-end // page_size) > len(req.pages):
            raise ValueError(f"request holds {len(req.pages)} pages, too few for {end} tokens")
        packed.add(req.token_slice(start, end), start, req.pages, req.slot)
        if all_logits or chunk.completes:
            logits_rows += range(len(packed.ids) - (chunk.num_tokens if all_logits else 1), len(packed.ids))
    num_pad = max(1, min_tokens - len(packed.ids)) if shape is None else shape.tokens - len(packed.ids)
    if num_pad < 0:
        assert shape is not None  # (only a bucket's step can be too big: else num_pad >= 1)
        raise ValueError(f"step of {len(packed.ids)} tokens does not fit its bucket of {shape.tokens}")
    for _ in range(num_pad):
        packed.add([0], 0, [scratch_page])
    num_logits = len(logits_rows)
    logits_rows += [len(packed.ids) - 1] * max(0, (2 if shape is None else shape.logits) - num_logits)
    if shape is not None:
        pad_request_table(packed.qo, packed.kv_ptr, packed.kv_idx, packed.last_len, page_size, shape.requests,
                          shape.pages, pad_pages)
    fields = [(packed.qo, torch.int32), (packed.kv_ptr, torch.int32), (packed.kv_idx, torch.int32),
              (packed.last_len, torch.int32), (packed.slots, torch.int64), (packed.ids, torch.int64),
              (packed.positions, torch.int64), (packed.feed, torch.int64), (logits_rows, torch.int64)]
    if staging is None:
        tensors = [to_device(list(values), dtype, device, pin) for values, dtype in fields]
    elif device.type != "cpu":
        raise ValueError("a staged step is built on the host (device 'cpu'); copy it with StepInputs.to")
    else:
        tensors = staging.pack(fields)
    qo, kv_ptr, kv_idx, last_len, slots, ids, positions, feed, logits_index = tensors
    metadata = AttentionMetadata(qo_indptr=qo, kv_indptr=kv_ptr, kv_indices=kv_idx, kv_last_page_len=last_len,
                                 slot_mapping=slots, kv_caches=kv_caches, backend=backend,
                                 kv_scales=kv_scales)
    return StepInputs(input_ids=ids, position_ids=positions, feed_slots=feed, logits_indices=logits_index,
                      num_logits=num_logits, metadata=metadata)


def to_device(values: Sequence[int], dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A host list as a tensor on `device`. A copy from pageable memory would make the host wait for the GPU
    (CUDA syncs the stream first), so CUDA-bound values go through pinned memory, asynchronously; the caching
    host allocator keeps the pinned block alive until the copy has run."""
    if device.type == "cuda" or (pin and torch.cuda.is_available()):
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
        return host.to(device, non_blocking=True) if device.type == "cuda" else host
    return torch.tensor(values, dtype=dtype, device=device)


def feed_pending(input_ids: torch.Tensor, feed_slots: torch.Tensor, last_tokens: torch.Tensor | None) -> torch.Tensor:
    """`input_ids` with each PENDING token replaced by its request's last sampled token (on the device)."""
    if last_tokens is None:
        return input_ids
    return torch.where(input_ids == PENDING, last_tokens[feed_slots], input_ids)

"""`Request`: one sequence in the engine's request table, from arrival to its last token."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["PENDING", "WAITING", "RUNNING", "FINISHED", "FAILED", "Request"]

# An output token sampled on the device whose value the host has not read back yet. A step that needs it as
# input carries PENDING in `input_ids` and the request's slot in `feed_slots`; the captured step substitutes the
# device-side value (`batch.feed_pending`), so the host never waits for the GPU to schedule the next step.
PENDING = -1

# Where a request is: waiting for admission (new or preempted), running (holds pages and a slot), or done.
WAITING, RUNNING, FINISHED, FAILED = "waiting", "running", "finished", "failed"


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, sampling parameters, generated tokens, and the KV pages and slot it holds.

    The engine owns every field; the scheduler only reads them. `output` may end in up to `MAX_LAG` PENDING
    tokens (sampled on the device, not yet read back). A preempted request goes back to WAITING with no pages
    and `num_cached` 0: it is recomputed later from its prompt plus the tokens it generated, so nothing is lost.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival: int = 0  # FIFO order of arrival
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    page_hashes: list[bytes] = field(default_factory=list, repr=False)  # (prefix caching) of its first full pages
    num_registered: int = 0  # (prefix caching) leading pages of `pages` registered in the prefix cache
    slot: int = -1  # entry of the step runner's device-side last-token table while running
    state: str = WAITING
    admitted: int = -1  # admission order while running (preemption takes the latest)
    done_generating: bool = False  # no more tokens will be scheduled (max tokens, EOS or cancelled)
    error: str | None = None
    num_preemptions: int = 0
    streaming: bool = False  # the listener hears of every resolved token, not only the end
    listener: Callable[[Request], None] | None = field(default=None, repr=False)
    timestamps: list[float] | None = None  # when each generated token was read back (if asked for)
    created_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float = -1.0
    finished_time: float = -1.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (prompt remainder, or the last sampled token)."""
        return self.num_tokens - self.num_cached

    @property
    def resolved(self) -> bool:
        """Whether every generated token's value is known on the host (none is PENDING)."""
        return not self.output or self.output[-1] != PENDING  # tokens resolve in order: pending ones are a suffix

    @property
    def finished(self) -> bool:
        return self.state in (FINISHED, FAILED)

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (the per-step hot path reads 1 decode token)."""
        split = len(self.prompt)
        return self.prompt[start:min(end, split)] + self.output[max(start - split, 0) : max(end - split, 0)]

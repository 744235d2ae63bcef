"""`StepContext`: what one step's captured code reads besides its tensors, set once per step by the step runner.

Dynamo and AOT pass tensors only, so everything else a step needs reaches the lowered step through this one
frozen object (as vLLM's forward context does): the attention plans of the step (a backend that plans on the
host: FlashInfer), the kernel standing in for the step's attention backend (the interim kernel while the
backend's own are built), the step's cut into nano-batches, and the timer that times its pieces. The step runner
sets it around the step's call (`step_context`); the program runner and the attention op read it (`current`).
It is per thread: two optimized models may step at once from two threads, and one model's step must never see the
other's context. Outside a step the context is empty (`EMPTY`): the step runs whole on its own backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["EMPTY", "StepContext", "current", "step_context"]


@dataclass(frozen=True)
class StepContext:
    """One step's context (see the module docstring)."""

    plans: Mapping[Any, Any] | None = None  # the whole step's attention plans, by `AttentionConfig` (a planner's)
    substitute: Any = None  # an `AttentionBackend` computing the step's attention calls instead of theirs
    nanobatches: Any = None  # the step's cut (`program_runner.NanobatchStep`); None: whole
    timer: Any = None  # a `program_runner.PieceTimer` marking each piece of a whole step


EMPTY = StepContext()
_local = threading.local()


def current() -> StepContext:
    """The context of the step this thread is running (or capturing); `EMPTY` outside a step."""
    return getattr(_local, "context", EMPTY)


@contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """Make `context` this thread's step context within the block (the previous one is restored after)."""
    previous = current()
    _local.context = context
    try:
        yield context
    finally:
        _local.context = previous

"""`ControlPlane`: one schedule for every tensor-parallel rank (SPMD), as transformers' own TP continuous
batching keeps its ranks together.

Every rank runs the same engine on its shard of the model; their steps' collectives only meet if every rank runs
the same steps. So every decision a rank makes must be the same on every rank:

- Requests enter on the TP group's rank 0, the *driver* (`generate`, `generate_batch`, the manager); at each
  step the driver's new requests and cancellations are broadcast over a CPU (gloo) group and every rank queues
  them in the same order, with the driver's ids and arrival numbers (`plan`).
- The scheduler is a pure function of the request table and the free pages, so identical tables give identical
  plans (admission, page allocation, preemption, prefix-cache hits); the KV cache is sized to the minimum over
  ranks (`agree_min`). The prefix cache's table too is a pure function of the requests' tokens and the plans
  (pages are registered once computed and their tokens read back, at the fixed lag below).
- Tokens are read back at a fixed lag (never "when ready", which depends on each rank's timing), so EOS ends a
  request at the same step everywhere; the logits are all-gathered (identical on every rank) and sampling draws
  from a generator seeded by the driver (`seed`).
- The schedule search (`num_nanobatches="auto"`) replays the same candidates in the same order on every rank (their
  steps' collectives meet), and every time it measures is the slowest rank's (`cost.measure.agreed`: a step is as
  slow as its slowest rank), so every rank prices, ranks and picks the same cuts; the driver's cost table is used.
- With `NanoFlowConfig.check_plans`, each step's plan is compared across ranks before it runs (one all-gather
  of a digest); ranks that differ raise `RankDivergenceError` naming the difference instead of hanging in the
  step's collectives.

Followers (ranks but the driver) step their engine as the driver's headers arrive (`follow`) until the driver
ends its session (`end_session`): each driver call that drives the engine (a `generate()`, a `generate_batch()`,
a manager's run) is one session, matched by the same call on every other rank (torchrun's ranks run one script).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nanoflow_fx.errors import NanoFlowError, RankDivergenceError
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.scheduler import StepPlan, schedule

__all__ = ["ControlPlane"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = 1  # header flag: the driver ended its session


class ControlPlane:
    """The CPU group of one TP group and what its ranks agree on (see the module docstring)."""

    def __init__(self, tp_group: Any, rank: int, world_size: int, check_plans: bool) -> None:
        """`tp_group`: the TP process group (its ranks, in order; TP rank 0 drives). Collective: every rank of
        the world calls it (a gloo group is made over the TP group's ranks)."""
        ranks = dist.get_process_group_ranks(tp_group)
        self.group = dist.new_group(ranks, backend="gloo", use_local_synchronization=len(ranks) < dist.get_world_size())
        self.root = ranks[0]  # the driver's global rank
        self.rank, self.world_size = rank, world_size
        self.is_driver = rank == 0
        self.check_plans = check_plans
        self.ended = False  # (followers) the driver ended the session being followed
        self.steps = 0  # plans made (each checked with this number)
        self.session: list[Request] = []  # (followers) requests the session followed so far added, in order
        self._cancels: list[str] = []  # (driver) ids to cancel at the next exchange
        self._live: dict[str, Request] = {}  # requests by id (cancellations name them)
        self._error: str | None = None  # (followers) why the driver's call failed

    @classmethod
    def of(cls, tp: Any, check_plans: bool) -> ControlPlane | None:
        """The plane of a `capture.tensor_parallel.TensorParallel` group; None without one, and in a "fake"
        world (one process tracing one rank: there is no other rank to agree with)."""
        if tp is None or dist.get_backend(tp.group) == "fake":
            return None
        return cls(tp.group, tp.rank, tp.world_size, check_plans)

    # ----------------------------------------------------------------------------------------- agreement
    def share(self, make: Callable[[], T]) -> T:
        """The driver's `make()` on every rank (its result broadcast); if it raised, every rank raises it."""
        value: Any = None
        if self.is_driver:
            try:
                value = make()
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                value = err
        holder = [value]
        dist.broadcast_object_list(holder, src=self.root, group=self.group)
        if isinstance(holder[0], Exception):
            raise holder[0]
        return holder[0]

    def agree_min(self, value: int) -> int:
        """The minimum of `value` over the ranks (e.g. the KV pages each rank's free memory allows)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, value, group=self.group)
        return every

    def seed(self) -> int:
        """A sampling seed drawn on the driver, the same on every rank."""
        return self.share(lambda: int(torch.randint(0, 2**62, (1,)).item()))

    # --------------------------------------------------------------------------------------- each step
    def plan(self, engine: Any) -> StepPlan | None:
        """The engine's next plan, the same on every rank: the driver's new requests and cancellations are
        exchanged first, then the pure scheduler runs and (with `check_plans`) its plan is compared across the
        ranks. None when the driver ended its session (a follower's step then does nothing)."""
        news: list[Request] = []
        if self.is_driver:
            while engine._inbox:
                news.append(engine._inbox.popleft())
        payload = (([_wire(r) for r in news], self._cancels) if news or self._cancels else None)
        self._cancels = []
        received, end = self._exchange(payload, end=False)
        if received is not None:
            self._apply(engine, news if self.is_driver else [_unwire(w) for w in received[0]], received[1])
            self._error = received[2] if len(received) > 2 else None
        if end:
            self.ended = True
            return None
        plan = schedule(engine.running, engine.waiting, engine.kv_cache.allocator.num_free, engine.limits,
                        engine.prefix)
        self.steps += 1
        if self.check_plans:
            self._check(plan, engine)
        return plan

    def cancel(self, request: Request) -> None:
        """Cancel `request` on every rank at the next exchange (the driver's cancellations count; a follower's
        are dropped: the driver's calls mirror them)."""
        if self.is_driver and not request.finished:
            self._cancels.append(request.request_id)

    def end_session(self, engine: Any, error: BaseException | None = None) -> None:
        """(Driver) end the session the followers follow; pending cancellations go with it, and `error` (the
        driver's call failed outside a step) is raised by the followers' `follow`. Not after a step raised: every
        rank raised there (a step's failure, a divergence), and no follower waits."""
        with engine.lock:
            message = f"{type(error).__name__}: {error}" if error is not None else None
            payload: Any = ([], self._cancels, message) if self._cancels or message else None
            self._cancels = []
            received, _ = self._exchange(payload, end=True)
            if received is not None:
                self._apply(engine, [], received[1])
            self._live = {k: r for k, r in self._live.items() if not r.finished}

    def follow(self, engine: Any) -> list[Request]:
        """(Follower) step `engine` as the driver's steps come, until the driver ends its session; returns the
        requests the session added (the driver's, mirrored), in order. Raises `NanoFlowError` if the driver's
        call failed (its message)."""
        self.ended, self.session, self._error = False, [], None
        while not self.ended:
            engine.step()
        self._live = {k: r for k, r in self._live.items() if not r.finished}
        if self._error is not None:
            raise NanoFlowError(f"tensor-parallel rank 0's call failed: {self._error}")
        return self.session

    # ----------------------------------------------------------------------------------------- helpers
    def _exchange(self, payload: Any, end: bool) -> tuple[Any, bool]:
        """One header all-gather (the driver's payload size and end flag) and, if there is a payload, its
        broadcast from the driver."""
        data = pickle.dumps(payload) if self.is_driver and payload is not None else b""
        header = torch.tensor([len(data), _END if (end and self.is_driver) else 0], dtype=torch.int64)
        rows = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(rows, header, group=self.group)
        size, flags = int(rows[0][0]), int(rows[0][1])
        if not size:
            return None, bool(flags & _END)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_driver
                  else torch.empty(size, dtype=torch.uint8))
        dist.broadcast(buffer, src=self.root, group=self.group)
        return (payload if self.is_driver else pickle.loads(buffer.numpy().tobytes())), bool(flags & _END)

    def _apply(self, engine: Any, news: list[Request], cancels: list[str]) -> None:
        if news and engine.before_new_requests is not None:
            engine.before_new_requests()
        for req in news:
            engine.waiting.append(req)
            self._live[req.request_id] = req
        if not self.is_driver:
            self.session.extend(news)
        for rid in cancels:
            dropped = self._live.pop(rid, None)
            if dropped is not None and not dropped.finished:
                engine.cancel_now(dropped)

    def _check(self, plan: StepPlan, engine: Any) -> None:
        """Raise `RankDivergenceError` on every rank unless every rank made this very plan."""
        described = _describe(plan, engine)
        digest = int.from_bytes(hashlib.blake2b(repr(described).encode(), digest_size=7).digest(), "little")
        mine = torch.tensor([digest, self.steps], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self.group)
        if all(torch.equal(r, rows[0]) for r in rows):
            return
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, described, group=self.group)
        differ = [r for r in range(self.world_size) if every[r] != every[0]]
        first = differ[0]
        fields = [k for k in every[0] if every[first].get(k) != every[0].get(k)]
        details = "; ".join(f"{k}: rank 0 {every[0][k]!r}, rank {first} {every[first][k]!r}" for k in fields)
        raise RankDivergenceError(
            f"tensor-parallel ranks {differ} planned step {self.steps} unlike rank 0 ({details}); every rank must "
            "see the same requests: add requests on TP rank 0 only (generate, generate_batch, the manager), with "
            "every rank calling the same methods in the same order")


def _wire(req: Request) -> tuple[Any, ...]:
    """What a follower needs to mirror a driver's request."""
    return (req.request_id, req.prompt, req.params, req.max_new_tokens, req.arrival, req.streaming,
            req.timestamps is not None)


def _unwire(wire: tuple[Any, ...]) -> Request:
    rid, prompt, params, max_new, arrival, streaming, stamps = wire
    return Request(rid, list(prompt), params, int(max_new), arrival=arrival, streaming=streaming,
                   timestamps=[] if stamps else None)


def _describe(plan: StepPlan, engine: Any) -> dict[str, Any]:
    """A step's plan as plain values (what the ranks compare)."""
    return {
        "chunks": [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks],
        "admitted": [r.request_id for r in plan.admitted],
        "preempted": [r.request_id for r in plan.preempted],
        "new_pages": [(r.request_id, n) for r, n in plan.new_pages],
        "hits": [(r.request_id, pages) for r, pages in plan.hits],
        "loads": [(r.request_id, n) for r, n in plan.loads],
        "free_pages": engine.kv_cache.allocator.num_free,
        "waiting": len(engine.waiting),
    }

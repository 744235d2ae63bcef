"""A pool of processes forming one torch.distributed world (gloo on the CPU), shared by the tests of a module.

Starting a process and its process group costs seconds (imports), so a module starts its world once
(`Workers`, a module-scoped fixture) and runs tasks on every rank at once: `workers.run(fn, *args)` calls the
module-level function `fn(*args)` in each rank (all ranks together, as torchrun's ranks run one script) and
returns each rank's result, or raises with the failing rank's traceback. A task that does not finish in time
(a hang) kills the world and fails the test. Each rank keeps what its tasks store in `STATE` between tasks.

Tasks must be module-level functions of an importable module (pickled by name); their arguments and results
plain picklable values.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["STATE", "Workers", "WorkerError", "rank"]

STATE: dict[str, Any] = {}  # a rank's models and results, kept between tasks (in that rank's process)


class WorkerError(AssertionError):
    """A task raised on some rank (the message holds each failing rank's traceback)."""


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(rank: int, world: int, port: int, backend: str, tasks: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # (the ranks share the machine's cores)
    if backend.startswith("fake:"):  # one process playing one rank of a larger world ("fake:8")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=int(backend.split(":")[1]))
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Workers:
    """`world` processes in one gloo process group (see the module docstring)."""

    def __init__(self, world: int = 2, backend: str = "gloo") -> None:
        """`backend`: "gloo", "nccl" (CUDA tests), or "fake:N" (one process as rank 0 of a fake world of N:
        collectives trace and run as no-ops)."""
        ctx = mp.get_context("spawn")
        self.world = world
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [ctx.Process(target=_serve, args=(r, world, port, backend, self._tasks[r], self._results),
                                   daemon=True) for r in range(world)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Any]:
        """`fn(*args)` on every rank at once; each rank's result, by rank."""
        for q in self._tasks:
            q.put((fn.__module__, fn.__name__, args))
        got: dict[int, tuple[bool, Any]] = {}
        while len(got) < self.world:
            try:
                r, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close(kill=True)
                raise WorkerError(f"{fn.__name__} did not finish on ranks {sorted(set(range(self.world)) - set(got))} "
                                  f"within {timeout} s (a hang); the world was stopped") from None
            got[r] = (ok, value)
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            raise WorkerError("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failed.items())))
        return [got[r][1] for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self._procs, self._tasks):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

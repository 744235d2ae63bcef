"""`Replicas`: data parallelism over tensor-parallel groups, a (dp, tp) world of independent engines.

Under `torchrun --nnodes K --nproc-per-node N`, a model sharded over the "tp" dimension of a (dp, tp) device mesh
(`init_device_mesh(..., (dp, tp), mesh_dim_names=("dp", "tp"))`, the model loaded or distributed over
`mesh["tp"]`) is one replica per TP group: each group runs its own engine, its own control plane and its own
collectives (TP inside a node; nothing crosses replicas while they step). What spans them is `generate_batch`:
every rank calls it with the same prompts (one script, as torchrun runs it), the TP drivers of the replicas check
that they hold the same ones, each replica runs its share (prompts dealt longest first, round robin, so the
replicas' token counts stay close), and every rank returns every result, under its index's id (`req_{i}`), in
input order. `generate()` and the manager stay per replica (a replica serves what its driver is given: replicas
behind a load balancer, each its own server). Communication between replicas is a CPU (gloo) group over the
whole world: twice per `generate_batch` (the prompts' digests, then the results).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from nanoflow_fx.errors import InvalidInputError, NanoFlowError, RankDivergenceError

__all__ = ["Replicas", "deal"]


def deal(lengths: Sequence[int], count: int) -> list[list[int]]:
    """The indices of `lengths` dealt to `count` replicas: longest first, round robin (ties in input order); each
    replica's share in input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [sorted(order[r::count]) for r in range(count)]


class Replicas:
    """The TP groups of the world (replicas, ordered by their first rank) and this rank's place among them."""

    def __init__(self, groups: Sequence[Sequence[int]], rank: int, group: Any) -> None:
        """`group`: a gloo group over the whole world (the replicas talk over it)."""
        self.groups = [tuple(g) for g in groups]
        self.index = next(i for i, g in enumerate(self.groups) if rank in g)
        self.count = len(self.groups)
        self.is_driver = self.groups[self.index][0] == rank
        self.group = group

    @classmethod
    def of(cls, tp_group: Any) -> Replicas | None:
        """The replicas of a world whose ranks form several TP groups, `tp_group` this rank's (None when it spans
        the world: one replica). Collective over the world. Raises `NanoFlowError` unless the TP groups
        partition the world into groups of one size."""
        world = dist.get_world_size()
        mine = tuple(dist.get_process_group_ranks(tp_group))
        if len(mine) == world:
            return None
        everyone = dist.new_group(backend="gloo")
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine, group=everyone)
        groups = sorted(set(gathered))
        covered = sorted(r for g in groups for r in g)
        if covered != list(range(world)) or len({len(g) for g in groups}) != 1:
            raise NanoFlowError(
                f"the tensor-parallel groups of this world of {world} ranks are {groups}: data parallelism needs them "
                "to split the world into equal groups, each rank in one (a (dp, tp) device mesh: "
                "init_device_mesh(device, (dp, tp), mesh_dim_names=('dp', 'tp')), the model sharded over mesh['tp'])")
        return cls(groups, dist.get_rank(), everyone)

    def _gather(self, value: Any) -> list[Any]:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, value, group=self.group)
        return every

    def generate_batch(self, inputs: list[list[int]], run: Callable[[list[list[int]], list[str]], dict[str, Any]],
                       follow: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Every result of `inputs` (the drivers' prompts; the followers' are not read), each replica running
        its share: on a driver, `run(prompts, request_ids)`; on a follower, `follow()` (its driver's steps).
        Raises on every rank if the drivers' prompts differ, or if any rank's part failed."""
        digest = problem = None
        if self.is_driver:
            try:
                ids = pickle.dumps([[int(t) for t in p] for p in inputs])
                digest = hashlib.blake2b(ids, digest_size=16).hexdigest()
            except (TypeError, ValueError) as err:  # (every rank must reach the gather below, or the others hang)
                problem = f"generate_batch's inputs must be lists of token ids ({type(err).__name__}: {err})"
        gathered = self._gather((digest, problem))
        problems = [(rank, message) for rank, (_, message) in enumerate(gathered) if message is not None]
        if problems:
            raise InvalidInputError(f"rank {problems[0][0]}: {problems[0][1]}")
        digests = {i: d for i, (d, _) in enumerate(gathered) if d is not None}
        if len(set(digests.values())) > 1:
            first = min(digests)
            differ = [r for r, d in digests.items() if d != digests[first]]
            raise RankDivergenceError(
                f"data-parallel replicas' drivers (ranks {sorted(digests)}) called generate_batch with different "
                f"prompts (ranks {differ} unlike rank {first}); every rank must pass the same prompts: the replicas "
                "share them out")
        error: BaseException | None = None
        results: dict[str, Any] = {}
        try:
            if self.is_driver:
                share = deal([len(p) for p in inputs], self.count)[self.index]
                results = run([inputs[i] for i in share], [f"req_{i}" for i in share])
            else:
                follow()
        except BaseException as err:  # noqa: BLE001 - every rank learns of it below, then raises
            error = err
        parts = self._gather((results if self.is_driver else None,
                              None if error is None else f"{type(error).__name__}: {error}"))
        failed = [(rank, message) for rank, (_, message) in enumerate(parts) if message is not None]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            raise NanoFlowError(f"generate_batch failed on rank {rank} (data-parallel replica "
                                f"{next(i for i, g in enumerate(self.groups) if rank in g)}): {message}")
        merged: dict[str, Any] = {}
        for part, _ in parts:
            if part is not None:
                merged.update(part)
        return {rid: merged[rid] for rid in sorted(merged, key=_input_order)}


def _input_order(request_id: str) -> tuple[int, int, str]:
    """`req_{i}` and its `num_return_sequences` children (`req_{i}__child#k`, before their parent, as transformers
    orders them) by input index."""
    parent, _, child = request_id.partition("__child#")
    return int(parent.removeprefix("req_")), 0 if child else 1, child.zfill(8)

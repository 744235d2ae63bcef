"""The Schedule IR: which token slice of which op group runs on which execution unit, in what order.

Plain frozen data, no FX and no CUDA. A `Schedule` is consumed by the cost model, the CPU executor and
the GPU runtime. Constructors check only what each record can check alone (a `Split`'s boundaries);
whole-schedule invariants (names resolve, every nano-op appears once, dependencies are kept, no cycles)
are checked by `nanoflow_fx.schedule.validate`.

    s = Schedule(
        num_tokens=1024,
        splits=(("s2", Split.even(1024, 2)),),
        groups=(OpGroup("L0.qkv", "gemm", "s2", ()), OpGroup("L0.attn", "attention", "s2", ("L0.qkv",))),
        units=("compute", "memory"),
        ops=(NanoOp("L0.qkv", 0, "compute"), NanoOp("L0.attn", 0, "memory", (("L0.qkv", 0),)), ...),
    )
"""

from __future__ import annotations

import bisect
import builtins
from dataclasses import dataclass
from functools import cached_property

from nanoflow_fx.errors import NanoFlowError

__all__ = ["OP_CLASSES", "NanoOp", "OpGroup", "Schedule", "ScheduleError", "Split", "op_label"]

OP_CLASSES: tuple[str, ...] = ("gemm", "attention", "collective", "other")
"""The op classes an `OpGroup` may have; the cost model prices each class differently."""


class ScheduleError(NanoFlowError, ValueError):
    """A schedule (or its text form) is malformed; the message names the op, group or line, and the fix."""


def op_label(key: tuple[str, int]) -> str:
    """The text name of nano-op `key`: ("L0.qkv", 1) -> "L0.qkv#1" (the same spelling as the text form)."""
    return f"{key[0]}#{key[1]}"


@dataclass(frozen=True)
class Split:
    """How one op group is cut into nano-batches: nano-batch i covers tokens [boundaries[i], boundaries[i+1]).

    Ensures: at least 2 boundaries, the first is 0, strictly increasing (so every nano-batch is non-empty).
    """

    boundaries: tuple[int, ...]
    """Token boundaries: 0 first, then the end of each nano-batch; the last one is the number of tokens."""

    def __post_init__(self) -> None:
        b = tuple(self.boundaries)
        object.__setattr__(self, "boundaries", b)
        if any(type(x) is not int for x in b):
            raise ScheduleError(f"Split boundaries must be ints, got {b!r}")
        if len(b) < 2 or b[0] != 0:
            raise ScheduleError(f"Split boundaries {b!r} must start at 0 and have at least 2 entries, e.g. (0, 512)")
        for i in range(len(b) - 1):
            if b[i] >= b[i + 1]:
                raise ScheduleError(
                    f"Split boundaries {b!r} must be strictly increasing: nano-batch {i} [{b[i]}, {b[i + 1]}) "
                    "is empty or reversed"
                )

    @staticmethod
    def even(num_tokens: int, n: int) -> Split:
        """`n` nano-batches whose sizes differ by at most 1 (the first ones take the remainder).

        Requires 1 <= n <= num_tokens. Split.even(10, 3) == Split((0, 4, 7, 10)).
        """
        if n < 1 or n > num_tokens:
            raise ScheduleError(
                f"Split.even(num_tokens={num_tokens}, n={n}): need 1 <= n <= num_tokens so no nano-batch is empty"
            )
        q, r = divmod(num_tokens, n)
        bounds = [0]
        for i in range(n):
            bounds.append(bounds[-1] + q + (1 if i < r else 0))
        return Split(tuple(bounds))

    @property
    def num_nanobatches(self) -> int:
        """How many nano-batches this split makes."""
        return len(self.boundaries) - 1

    @property
    def num_tokens(self) -> int:
        """The number of tokens split (the last boundary)."""
        return self.boundaries[-1]

    def range(self, i: int) -> tuple[int, int]:
        """Tokens [start, end) of nano-batch `i`; raises ScheduleError if i is not in [0, num_nanobatches)."""
        if not 0 <= i < self.num_nanobatches:
            raise ScheduleError(f"nano-batch {i} out of range: this split has {self.num_nanobatches} nano-batches")
        return self.boundaries[i], self.boundaries[i + 1]

    def overlapping(self, start: int, end: int) -> builtins.range:  # the `range` method shadows the builtin here
        """The nano-batches whose token range meets [start, end) (empty if the range is empty or outside).

        Split((0, 256, 512, 768, 1024)).overlapping(0, 512) == range(0, 2).
        """
        b = self.boundaries
        first = max(bisect.bisect_right(b, start) - 1, 0)
        last = min(bisect.bisect_left(b, end) - 1, len(b) - 2)
        return range(first, last + 1) if start < end else range(0)


@dataclass(frozen=True)
class OpGroup:
    """One op group of the unsplit step graph (e.g. "L0.qkv"), cut into nano-batches by one named Split."""

    name: str
    """Unique name, e.g. "L0.qkv"."""
    op_class: str
    """One of OP_CLASSES: "gemm", "attention", "collective" or "other"."""
    split: str
    """The name of the Split (in Schedule.splits) this group is cut by."""
    deps: tuple[str, ...] = ()
    """The groups whose outputs this group consumes (edges of the unsplit graph)."""


@dataclass(frozen=True)
class NanoOp:
    """One nano-batch of one group, placed on one execution unit (a stream), with explicit cross-op waits."""

    group: str
    """The OpGroup this is a slice of."""
    nanobatch: int
    """Which nano-batch of the group's split."""
    unit: str
    """The execution unit (stream) it runs on, e.g. "compute" or "memory"."""
    waits: tuple[tuple[str, int], ...] = ()
    """Nano-ops (group, nanobatch) that must finish before this one starts (besides program order)."""

    @property
    def key(self) -> tuple[str, int]:
        """(group, nanobatch): the identity of this nano-op within a schedule."""
        return self.group, self.nanobatch


@dataclass(frozen=True)
class Schedule:
    """A nano-batched step: splits, op groups, execution units and the nano-ops in global program order.

    Ops on the same unit run in the order they appear in `ops` (like kernels on a stream); ops on
    different units are ordered only by `waits`. Every Split's num_tokens must equal `num_tokens`
    (checked by `validate`, as are all other whole-schedule invariants).
    """

    num_tokens: int
    """Tokens in the step (the unsplit batch)."""
    splits: tuple[tuple[str, Split], ...]
    """Named splits, e.g. (("s4", Split.even(1024, 4)), ("s2", Split.even(1024, 2)))."""
    groups: tuple[OpGroup, ...]
    """The op groups of the unsplit graph, in a topological order by convention."""
    units: tuple[str, ...]
    """Execution units (streams), e.g. ("compute", "memory")."""
    ops: tuple[NanoOp, ...]
    """Every nano-op exactly once, in global program order."""

    @cached_property
    def _split_index(self) -> dict[str, Split]:
        return dict(self.splits)

    @cached_property
    def _group_index(self) -> dict[str, OpGroup]:
        return {g.name: g for g in self.groups}

    def group(self, name: str) -> OpGroup:
        """The OpGroup called `name`; raises ScheduleError naming the known groups if there is none."""
        try:
            return self._group_index[name]
        except KeyError:
            known = ", ".join(g.name for g in self.groups[:8]) + (", ..." if len(self.groups) > 8 else "")
            raise ScheduleError(f"unknown group {name!r}; known groups: {known}") from None

    def split(self, name: str) -> Split:
        """The Split called `name`; raises ScheduleError naming the known splits if there is none."""
        try:
            return self._split_index[name]
        except KeyError:
            raise ScheduleError(f"unknown split {name!r}; known splits: {[n for n, _ in self.splits]}") from None

    def split_of(self, group_name: str) -> Split:
        """The Split that group `group_name` is cut by."""
        return self.split(self.group(group_name).split)

    def ops_on(self, unit: str) -> tuple[NanoOp, ...]:
        """The ops on `unit`, in program order (the order they run in)."""
        return tuple(op for op in self.ops if op.unit == unit)

    def token_range(self, group: str, nanobatch: int) -> tuple[int, int]:
        """Tokens [start, end) covered by nano-batch `nanobatch` of `group`."""
        try:
            return self.split_of(group).range(nanobatch)
        except ScheduleError as e:
            raise ScheduleError(f"{op_label((group, nanobatch))}: {e}") from None

"""`NanobatchPlan`: how one step's tokens are cut, per op group (the policy the split pass takes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nanoflow_fx.schedule import Split

__all__ = ["NanobatchPlan", "WHOLE"]

WHOLE = "all"  # the split of groups that are not cut: one nano-batch of every token


@dataclass(frozen=True)
class NanobatchPlan:
    """Named token splits of a step of `num_tokens` tokens, and which split cuts each group.

    Groups absent from `group_splits` stay whole. Different groups may use different splits (NanoFlow cuts
    QKV and attention 4 ways but O and the MLP 2 ways for 70B models); the split pass inserts the merges and
    re-slices that implies.
    """

    num_tokens: int
    splits: tuple[tuple[str, Split], ...]
    group_splits: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = dict(self.splits)
        if WHOLE in names:
            raise ValueError(f"split name {WHOLE!r} is reserved for groups that are not cut")
        for name, split in self.splits:
            if split.num_tokens != self.num_tokens:
                raise ValueError(f"split {name!r} covers {split.num_tokens} tokens, the step has {self.num_tokens}")
        for group, name in self.group_splits:
            if name not in names:
                raise ValueError(f"group {group!r} uses unknown split {name!r}; known: {sorted(names)}")

    def split(self, name: str) -> Split:
        return Split((0, self.num_tokens)) if name == WHOLE else dict(self.splits)[name]

    def split_of(self, group: str) -> str:
        return dict(self.group_splits).get(group, WHOLE)

    @property
    def max_nanobatches(self) -> int:
        return max((s.num_nanobatches for _, s in self.splits), default=1)

    @staticmethod
    def uniform(groups: Iterable[str], boundaries: tuple[int, ...]) -> NanobatchPlan:
        """Every given group cut at the same `boundaries`."""
        split = Split(tuple(boundaries))
        return NanobatchPlan(split.num_tokens, (("nb", split),), tuple((g, "nb") for g in groups))

    @staticmethod
    def by_kind(groups: Iterable[str], num_tokens: int, counts: Mapping[str, int]) -> NanobatchPlan:
        """Even splits by group kind, e.g. {"qkv": 4, "attn": 4, "o": 2, "ffn": 2, "embed": 2} (NanoFlow 70B)."""
        splits = {n: Split.even(num_tokens, n) for n in sorted(set(counts.values())) if n > 1}
        group_splits = []
        for group in groups:
            count = counts.get(group.split(".")[-1].rstrip("0123456789"), 1)
            if count > 1:
                group_splits.append((group, f"s{count}"))
        return NanobatchPlan(num_tokens, tuple((f"s{n}", s) for n, s in splits.items()), tuple(group_splits))

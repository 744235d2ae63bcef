"""Graph passes over the captured step (each `GraphModule -> GraphModule`, one a file) and their runner.

    annotate -> group_ops -> split_nanobatches(plan) -> assign_units(policy) -> Schedule

Invariants every pass keeps (tests hold them): results never change (any split, any request mix, any
supported model); every nano-op runs exactly once per step and every dependency of the unsplit graph is kept;
weights are never split or copied, only token-dimension activations; the only mutation stays the attention
op's KV-cache write, and no pass adds aliasing; `meta["val"]` stays valid where present.
"""

from torch.fx import GraphModule

from nanoflow_fx.passes.annotate import annotate, token_symbol
from nanoflow_fx.passes.assign_units import UnitPolicy, assign_units, nanoop_nodes
from nanoflow_fx.passes.group_ops import group_names, group_ops
from nanoflow_fx.passes.info import META_KEY, NodeInfo, info
from nanoflow_fx.passes.pipeline import PassRecord, run_passes
from nanoflow_fx.passes.plan import WHOLE, NanobatchPlan
from nanoflow_fx.passes.split_nanobatches import METADATA_FIELDS, split_nanobatches

__all__ = [
    "META_KEY",
    "METADATA_FIELDS",
    "WHOLE",
    "NanobatchPlan",
    "NodeInfo",
    "PassRecord",
    "UnitPolicy",
    "annotate",
    "assign_units",
    "group_names",
    "group_ops",
    "info",
    "nanoop_nodes",
    "run_passes",
    "split_nanobatches",
    "splittable_groups",
    "token_symbol",
]


def splittable_groups(gm: GraphModule) -> list[str]:
    """Groups of an annotated, grouped graph whose nodes are all token-parallel (the ones a plan may cut)."""
    blocked = {info(n).group for n in gm.graph.nodes if n.op == "call_function" and info(n).group is not None
               and not info(n).token_parallel}
    return [g for g in group_names(gm) if g not in blocked]

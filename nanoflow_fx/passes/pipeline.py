"""The pass pipeline runner: runs passes in order, lints and recompiles after each, records every stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.fx import GraphModule

__all__ = ["PassRecord", "run_passes"]

log = logging.getLogger(__name__)
Pass = Callable[[GraphModule], GraphModule]


@dataclass(frozen=True)
class PassRecord:
    """One stage: the pass's name, the graph's node count after it, and the pass's wall time."""

    name: str
    num_nodes: int
    seconds: float
    code: str = field(repr=False, default="")


def run_passes(
    gm: GraphModule,
    passes: Sequence[tuple[str, Pass]],
    dump_dir: str | Path | None = None,
    keep_code: bool = False,
) -> tuple[GraphModule, list[PassRecord]]:
    """Run `passes` in order; after each, lint and recompile. With `dump_dir`, write each stage's code there."""
    records = [PassRecord("captured", len(gm.graph.nodes), 0.0, gm.code if keep_code else "")]
    for index, (name, fn) in enumerate(passes):
        start = time.perf_counter()
        gm = fn(gm)
        gm.graph.lint()
        gm.recompile()
        seconds = time.perf_counter() - start
        records.append(PassRecord(name, len(gm.graph.nodes), seconds, gm.code if keep_code else ""))
        log.debug("pass %s: %d nodes, %.3f s", name, len(gm.graph.nodes), seconds)
        if dump_dir is not None:
            path = Path(dump_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{index + 1:02d}_{name}.py").write_text(gm.code)
    return gm, records

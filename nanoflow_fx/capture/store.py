"""Persisted steps: a captured and lowered step kept on disk, so that a later process skips Dynamo and AOT.

Tracing an 8B model's forward costs Dynamo ~8 s and AOTAutograd ~13 s on every process start (H100 host,
benchmarks/RESULTS.md); Inductor's own cache only saves the compile of the pieces after them. So once a step is
captured and lowered, `StepStore` saves what runs:

- how each of the lowered graph's inputs is read off a step call (`sources`: Dynamo's own expressions, such as
  `L['model']._modules['lm_head']._parameters['weight']` or `L['input_ids'].size()[0]`, checked against the
  values Dynamo passed when saving),
- the lowered graph itself as code (the ATen graph, or its split into attention calls and pieces),
- each distinct Inductor-compiled piece as Inductor's generated module (`piecewise.SavedPiece`), whose kernels
  come back from Triton's (or the C++ compiler's) on-disk cache.

The file is keyed (`step_key`) by everything the captured graph depends on: nanoflow_fx's source, the versions of
torch, transformers, triton and Python, the device, the model class, its config, every parameter's and buffer's
name, shape, stride, dtype and storage layout (the fused linears' views), the `NanoFlowConfig` fields the graph
depends on (page size, Inductor, fused linears, nano-batch count; not the budgets: the step's sizes are symbolic)
and the attention backend. A loaded step serves only calls with the attention backend and layer count it was captured
with (the rest go through Dynamo), and `optimize()` checks it against the eager model like a fresh capture: a
mismatch discards the file and traces again. Like Inductor's cache, the directory runs code when loaded: keep it
private to the user.

Nano-batched configurations (`num_nanobatches` other than 1) are not persisted: their program keeps symbolic
per-value metadata that only a trace produces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from nanoflow_fx.capture.piecewise import CompiledPiece, SavedPiece, _Compiled
from nanoflow_fx.ops.metadata import AttentionMetadata

__all__ = ["LoadedStep", "SavedStep", "StepStore", "saved_step", "source_name", "step_key"]

log = logging.getLogger(__name__)

_FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]


class _Slot(torch.nn.Module):
    """Where a compiled piece goes back in a saved split graph (`SavedStep.pieces[index]`)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a saved step's compiled piece was not loaded")


@dataclass
class SavedStep:
    """What `StepStore` writes: see the module docstring."""

    sources: tuple[str, ...]
    graph: GraphModule  # the lowered graph; compiled pieces replaced by `_Slot`s
    pieces: tuple[SavedPiece, ...]
    backend: str  # AttentionMetadata.backend of the capture
    num_caches: int


def source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's expression for a placeholder of the graph it hands a backend (None if it has none)."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in newer torch, a method in older
    return name() if callable(name) else name


def saved_step(sources: Sequence[str | None], lowered: Any, metadata: AttentionMetadata) -> SavedStep | None:
    """`lowered` (the ATen GraphModule, or the split GraphModule `piecewise.compile_pieces` returns) as a
    `SavedStep`, or None when it cannot be saved (an input without a source, an unsaveable piece, a program)."""
    if any(s is None for s in sources) or not isinstance(lowered, GraphModule):
        return None
    graph = Graph()
    graph.output(graph.graph_copy(lowered.graph, {}))
    saved = GraphModule(lowered, graph)  # the same submodules and attributes, a graph without node metadata
    pieces: list[SavedPiece] = []
    slots: dict[int, int] = {}  # compiled piece (shared by identical layers) -> its index in `pieces`
    # By call site, not `named_children()`: identical layers share one compiled module, listed there only once.
    for name in dict.fromkeys(n.target for n in saved.graph.find_nodes(op="call_module")):
        module = saved.get_submodule(name)
        if not isinstance(module, _Compiled):
            continue
        if id(module.fn) not in slots:
            piece = module.fn.saved() if isinstance(module.fn, CompiledPiece) else None
            if piece is None:
                return None
            slots[id(module.fn)] = len(pieces)
            pieces.append(piece)
        setattr(saved, name, _Slot(slots[id(module.fn)]))
    return SavedStep(tuple(s for s in sources if s is not None), saved, tuple(pieces), metadata.backend,
                     len(metadata.kv_caches))


class LoadedStep:
    """A lowered step that runs without Dynamo: called like the step function, it reads the graph's inputs off
    the call with Dynamo's source expressions and runs the lowered graph (no guards: `accepts` is the check).
    Built from a `SavedStep` (`from_saved`) or from a trace (`capture.replicate`)."""

    def __init__(self, graph: Any, sources: Sequence[str | None], backend: str, num_caches: int) -> None:
        if any(s is None for s in sources):
            raise ValueError("every input of a step run without Dynamo needs a source")
        self.graph = graph
        self.backend, self.num_caches = backend, num_caches
        self.read_inputs = self.reader([s for s in sources if s is not None])

    @classmethod
    def from_saved(cls, saved: SavedStep) -> LoadedStep:
        compiled = [_Compiled(piece.load()) for piece in saved.pieces]
        graph = saved.graph
        for name in dict.fromkeys(n.target for n in graph.graph.find_nodes(op="call_module")):
            module = graph.get_submodule(name)
            if isinstance(module, _Slot):
                setattr(graph, name, compiled[module.index])
        return cls(graph, saved.sources, saved.backend, saved.num_caches)

    @staticmethod
    def reader(sources: Sequence[str]) -> Any:
        """A function of the call's arguments by name (`L`) returning the graph's inputs."""
        return eval(  # noqa: S307 - Dynamo's own source expressions, from our cache
            compile(f"lambda L: ({', '.join(sources)},)", "<nanoflow_fx step inputs>", "eval"))

    def accepts(self, metadata: AttentionMetadata) -> bool:
        return metadata.backend == self.backend and len(metadata.kv_caches) == self.num_caches

    def __call__(self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_indices: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        inputs = self.read_inputs(dict(model=model, input_ids=input_ids, position_ids=position_ids,
                                       logits_indices=logits_indices, metadata=metadata))
        return self.graph(*inputs)[0]  # type: ignore[no-any-return]


class StepStore:
    """One saved step on disk: `<directory>/<key>.pt`."""

    def __init__(self, directory: str | os.PathLike[str], key: str) -> None:
        self.path = Path(directory) / f"{key}.pt"

    def save(self, step: SavedStep) -> None:
        """Write atomically (a concurrent reader sees the old file or the new one, never half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"format": _FORMAT, "step": step}, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> LoadedStep | None:
        """The saved step, loaded; None if there is none. A file that does not load (written by another
        version, truncated) is removed with a warning, and the step is traced again."""
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, weights_only=False)
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"unknown format {data.get('format') if isinstance(data, dict) else type(data)}")
            return LoadedStep.from_saved(data["step"])
        except Exception as e:  # noqa: BLE001 - any failure means: trace as if there were no file
            log.warning("nanoflow_fx: could not load the saved step %s (%s: %s); tracing it again", self.path,
                        type(e).__name__, e)
            self.discard()
            return None

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def step_key(model: torch.nn.Module, config: dict[str, Any], backend: str) -> str:
    """What a captured step depends on (see the module docstring), hashed; `config`: the `NanoFlowConfig` fields
    the graph depends on."""
    import transformers

    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        h.update(json.dumps(parts, default=str, sort_keys=True).encode())
        h.update(b"\0")

    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    add(_FORMAT, sys.version, torch.__version__, transformers.__version__, _triton_version(), torch.version.cuda)
    device = next(model.parameters()).device
    if device.type == "cuda":
        add(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    add(type(model).__module__, type(model).__qualname__, model.config.to_dict(), config, backend)
    storages: dict[int, int] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        storage = storages.setdefault(t.untyped_storage().data_ptr(), len(storages))
        add(name, tuple(t.shape), t.stride(), str(t.dtype), str(t.device), t.storage_offset(), storage)
    return h.hexdigest()[:32]


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)

"""Persisted steps: a captured and lowered step kept on disk, so that a later process skips Dynamo and AOT.

Dynamo and AOTAutograd trace a model's forward again in every process, a large part of its time to the first
token (benchmarks/RESULTS.md, first-token sections); Inductor's own cache only saves the compile of the pieces
after them. So once a step is captured and lowered, `StepStore` saves what runs:

- how each of the lowered graph's inputs is read off a step call (`sources`: Dynamo's own expressions, such as
  `L['model']._modules['lm_head']._parameters['weight']` or `L['input_ids'].size()[0]`, checked against the
  values Dynamo passed when saving),
- the lowered program (`capture.program.StepProgram`: its pieces, attention calls, value names, token dimensions
  and symbolic sizes), each dense piece as FX code or, Inductor-compiled, as Inductor's generated module
  (`inductor.SavedPiece`, one per distinct piece), whose kernels come back from Triton's (or the C++ compiler's)
  on-disk cache.

The file is keyed (`step_key`) by everything the captured graph depends on: nanoflow_fx's source, the versions of
torch, transformers, triton and Python, the device, the model class, its config, every parameter's and buffer's
name, shape, stride, dtype and storage layout (the fused linears' views), the `NanoFlowConfig` fields the graph
depends on (the page size, the KV cache's dtype and the lowering's key, `capture.lowering.Lowering.key`; not the
budgets, since the step's sizes are symbolic, nor the nano-batch count: a cut is chosen per step at run time) and
the attention backend. A loaded step serves only calls with the attention backend, layer count and KV-cache dtype
it was captured with (the rest go through Dynamo; an FP8 cache's step reads each layer's scales, which another
cache has not), and `optimize()` checks it against the eager model like a fresh capture: a
mismatch discards the file and traces again. Like Inductor's cache, the directory runs code when loaded: keep it
private to the user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule

from nanoflow_fx.capture.inductor import CompiledPiece, SavedPiece
from nanoflow_fx.ops.metadata import AttentionMetadata

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["LoadedStep", "SavedStep", "StepStore", "cache_dtype_of", "saved_step", "source_name", "step_key"]

log = logging.getLogger(__name__)

_FORMAT = 3
_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass
class SavedStep:
    """What `StepStore` writes: see the module docstring."""

    sources: tuple[str, ...]
    program: Any  # the `StepProgram`, each dense piece's `fn` an index into `pieces`
    pieces: tuple[SavedPiece | GraphModule, ...]  # Inductor's module, or the piece's FX code
    backend: str  # AttentionMetadata.backend of the capture
    num_caches: int
    kv_dtype: str  # the KV cache's dtype (`cache_dtype_of`)


def source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's expression for a placeholder of the graph it hands a backend (None if it has none)."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in newer torch, a method in older
    return name() if callable(name) else name


def saved_step(sources: Sequence[str | None], lowered: Any, metadata: AttentionMetadata) -> SavedStep | None:
    """`lowered` (the `ProgramRunner` the lowering made) as a `SavedStep`, or None when it cannot be saved (an
    input without a source, a piece Inductor compiled with opaque constants)."""
    if any(s is None for s in sources):
        return None
    program = lowered.program
    pieces: list[SavedPiece | GraphModule] = []
    index: dict[int, int] = {}  # a piece's fn (shared by identical layers when compiled) -> its index in `pieces`
    saved_pieces = []
    for piece in program.pieces:
        if piece.fn is not None:
            if id(piece.fn) not in index:
                if isinstance(piece.fn, CompiledPiece):
                    saved: SavedPiece | GraphModule | None = piece.fn.saved()
                    if saved is None:
                        return None
                elif isinstance(piece.fn, GraphModule):
                    saved = piece.fn
                else:
                    return None
                index[id(piece.fn)] = len(pieces)
                pieces.append(saved)
            piece = dataclasses.replace(piece, fn=index[id(piece.fn)])
        saved_pieces.append(piece)
    saved_program = dataclasses.replace(program, pieces=tuple(saved_pieces))
    saved_program.__dict__.pop("schedule_key", None)  # (a cached property: recomputed when loaded)
    return SavedStep(tuple(s for s in sources if s is not None), saved_program, tuple(pieces), metadata.backend,
                     len(metadata.kv_caches), cache_dtype_of(metadata))


def cache_dtype_of(metadata: AttentionMetadata) -> str:
    """The KV cache's dtype as a step records it ("" without layers)."""
    return str(metadata.kv_caches[0].dtype) if metadata.kv_caches else ""


class LoadedStep:
    """A lowered step that runs without Dynamo: called like the step function, it reads the graph's inputs off
    the call with Dynamo's source expressions and runs the lowered program (`graph`, a `ProgramRunner`; no guards:
    `accepts` is the check).
    Built from a `SavedStep` (`from_saved`) or from a trace (`capture.replicate`)."""

    def __init__(self, graph: Any, sources: Sequence[str | None], backend: str, num_caches: int,
                 kv_dtype: str) -> None:
        if any(s is None for s in sources):
            raise ValueError("every input of a step run without Dynamo needs a source")
        self.graph = graph
        self.backend, self.num_caches, self.kv_dtype = backend, num_caches, kv_dtype
        self.read_inputs = self.reader([s for s in sources if s is not None])

    @classmethod
    def from_saved(cls, saved: SavedStep) -> LoadedStep:
        from nanoflow_fx.runtime.program_runner import ProgramRunner

        fns = [piece.load() if isinstance(piece, SavedPiece) else piece for piece in saved.pieces]
        pieces = tuple(dataclasses.replace(p, fn=fns[p.fn]) if p.fn is not None else p
                       for p in saved.program.pieces)
        return cls(ProgramRunner(dataclasses.replace(saved.program, pieces=pieces)), saved.sources, saved.backend,
                   saved.num_caches, saved.kv_dtype)

    @staticmethod
    def reader(sources: Sequence[str]) -> Any:
        """A function of the call's arguments by name (`L`) returning the graph's inputs."""
        return eval(  # noqa: S307 - Dynamo's own source expressions, from our cache
            compile(f"lambda L: ({', '.join(sources)},)", "<nanoflow_fx step inputs>", "eval"))

    def accepts(self, metadata: AttentionMetadata) -> bool:
        return (metadata.backend == self.backend and len(metadata.kv_caches) == self.num_caches
                and cache_dtype_of(metadata) == self.kv_dtype)

    def __call__(self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_indices: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        inputs = self.read_inputs(dict(model=model, input_ids=input_ids, position_ids=position_ids,
                                       logits_indices=logits_indices, metadata=metadata))
        return self.graph(*inputs)[0]


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


def step_key(model: PreTrainedModel, config: dict[str, Any], backend: str) -> str:
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

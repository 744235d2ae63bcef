"""Inductor for the dense pieces of the lowered step (`capture.program`): the captured step's ops between attention
calls, compiled (fused) by Inductor.

HF's modules run RMSNorm, RoPE, SiLU-and-multiply and residual adds as many small kernels. Inductor fuses them,
but its functionalisation must not see the KV-cache write (it would copy the cache every step), so the ATen
graph is cut at every `nanoflow::paged_attention` call (as vLLM and SGLang cut theirs): each attention call stays
as captured, mutating the cache in place, and each piece between them, purely functional, is compiled by
Inductor for the graph's symbolic shapes (one compile serves every step size).

Identical layers give identical pieces: each distinct piece (same code once nodes are named by position, same
input shapes, strides and dtypes) is compiled once and its compiled code reused, so an 8B model's 33 pieces cost
3 compiles, independent of Inductor's on-disk cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

__all__ = ["CompiledPiece", "PieceCompiler", "SavedPiece", "inductor_compile"]


class CompiledPiece:
    """A piece's Inductor output, called with the piece's arguments. `saved()` gives what reloads it in another
    process without tracing or compiling again (`SavedPiece`): Inductor's generated module (its source, which
    builds its kernels from Triton's or the C++ compiler's on-disk cache), its constants, and which inputs it
    assumed aligned."""

    def __init__(self, compiled: Any, single: bool) -> None:
        self.compiled, self.single = compiled, single  # single: the piece returns one value, not a tuple

    def __call__(self, *args: Any) -> Any:
        out = self.compiled(list(args))
        return out[0] if self.single else out

    def saved(self) -> SavedPiece | None:
        """None when this Inductor's output cannot be reloaded from its source (torchbind or opaque constants)."""
        source = getattr(self.compiled, "source_code", None)
        constants = getattr(self.compiled, "constants", None) or {}
        if not isinstance(source, str) or getattr(self.compiled, "torchbind_constants", None) or not all(
                isinstance(v, torch.Tensor) for v in constants.values()):
            return None
        return SavedPiece(source, dict(constants), tuple(getattr(self.compiled, "inputs_to_check", ())), self.single)


@dataclass(frozen=True)
class SavedPiece:
    """A compiled piece as `capture.store` persists it (see `CompiledPiece.saved`)."""

    source: str  # Inductor's generated Python module; its `call(args)` runs the piece
    constants: dict[str, torch.Tensor]
    inputs_to_check: tuple[int, ...]  # inputs the generated code assumes aligned (copied first if they are not)
    single: bool

    def load(self) -> Callable[..., Any]:
        from torch._inductor import config
        from torch._inductor.codecache import PyCodeCache

        # Its kernels come from Triton's cache: in this process, without starting Inductor's compile workers.
        with config.patch(compile_threads=1):
            module = PyCodeCache.load(self.source)
        for name, value in self.constants.items():
            setattr(module, name, value)
        call, check, single = module.call, self.inputs_to_check, self.single

        def run(*args: Any) -> Any:
            inputs = list(args)
            for i in check:
                x = inputs[i]
                if isinstance(x, torch.Tensor) and x.data_ptr() % _ALIGNMENT:
                    inputs[i] = x.clone(memory_format=torch.preserve_format)
            out = call(inputs)
            return out[0] if single else out

        return run


_ALIGNMENT = 16  # bytes; Inductor's alignment assumption for tensor inputs


def _canonical_names(piece: GraphModule) -> None:
    """Name the nodes by position only. Inductor's FX graph cache keys on the graph's code: with the names the
    capture gave (per layer: `mm_7`, `mm_11`, ...) every layer's piece would miss it; by position, the pieces
    of identical layers are one cache entry, compiled once (an 8B model's 33 pieces: 3 distinct ones)."""
    for i, node in enumerate(piece.graph.nodes):  # two rounds: a new name never collides with an old one
        node._rename(f"_nanoflow_tmp_{i}")
    for i, node in enumerate(piece.graph.nodes):
        node._rename(f"arg{i}" if node.op == "placeholder" else f"v{i}")
        if node.op == "placeholder":
            node.target = node.name  # the argument's name in the generated code
    piece.recompile()


def _piece_key(piece: GraphModule, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """What a piece's compiled code depends on: its code (nodes named by position) and its inputs' metadata.
    Symbolic sizes print as their expressions, which identical layers share (one token-count symbol)."""
    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (str(tuple(value.shape)), str(value.stride()), value.dtype, value.device.type)
        return repr(value)

    return (piece.code, tuple(meta(v) for v in inputs))


def inductor_compile(piece: GraphModule, inputs: list[Any]) -> CompiledPiece:
    """`piece` compiled by Inductor for `inputs` (fake values, inside their fake mode) -> a callable taking the
    piece's arguments."""
    from torch._guards import TracingContext
    from torch._inductor.compile_fx import compile_fx_inner, graph_returns_tuple

    single = not graph_returns_tuple(piece)
    if single:  # Inductor compiles graphs that return a tuple: return the one value as one
        output = piece.graph.output_node()
        output.args = ((output.args[0],),)
        piece.recompile()
    # Each compile records its outputs' strides in the tracing context, which expects one compile per context:
    # give each piece a clean slate and restore the outer graph's record afterwards.
    context = TracingContext.try_get()
    saved = context.output_strides if context is not None else None
    if context is not None:
        context.output_strides = []
    try:
        return CompiledPiece(compile_fx_inner(piece, inputs), single)
    finally:
        if context is not None:
            context.output_strides = saved


class PieceCompiler:
    """Inductor for attention-free pieces, one compile per distinct piece (`_piece_key`), inside the fake mode of
    the captured graph's `example_inputs`."""

    def __init__(self, example_inputs: Sequence[Any]) -> None:
        from torch._guards import detect_fake_mode

        self.fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.fake_tensor.FakeTensorMode()
        self.by_key: dict[tuple[Any, ...], Callable[..., Any]] = {}

    @property
    def compiles(self) -> int:
        return len(self.by_key)

    def compile(self, piece: GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        """`piece` (renamed by position in place) compiled for `inputs` (its placeholders' fake values)."""
        _canonical_names(piece)
        key = _piece_key(piece, inputs)
        if key not in self.by_key:
            with self.fake_mode:
                self.by_key[key] = inductor_compile(piece, inputs)
        return self.by_key[key]

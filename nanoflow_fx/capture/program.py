"""`StepProgram`: the captured step lowered to pieces (dense code between attention calls) and attention calls.

What every configuration runs (`capture.lowering`). The ATen graph is cut at every `nanoflow::paged_attention`
call; each run of nodes between two calls becomes a dense piece (a GraphModule, Inductor-compiled when asked: it
fuses norms, RoPE, activations and residual adds around the GEMMs, `capture.inductor`), each call an attention
piece. Every value that crosses pieces is named by its node in the captured graph and carries its token
dimension, so a runner can execute a piece on any token slice of the step (`runtime.program_runner`): dense
pieces are token-parallel (checked by the `annotate` pass), so a piece run on rows [a, b) of its inputs gives
rows [a, b) of its outputs, and its code, traced with a symbolic token count, serves every slice. Pieces that
mix tokens (the logits selection before the LM head, a sorting MoE dispatch) are marked whole: a runner joins
the nano-batches before them. A whole step runs the pieces in order.

Identical layers give identical pieces: each distinct dense piece (same code once nodes are named by position,
same input metadata) is compiled once.

Under tensor parallelism each all-reduce (with its wait) is a piece of its own, "collective": a row slice of an
all-reduce is the all-reduce of the row slice (`passes.annotate`), so nano-batches run through it, and schedules
with execution units put it on a "network" unit (NanoFlow's: one nano-batch's all-reduce under another's GEMMs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import sympy
import torch
from torch.fx import Graph, GraphModule, Node

from nanoflow_fx.capture.inductor import PieceCompiler
from nanoflow_fx.passes.annotate import annotate, token_symbol
from nanoflow_fx.passes.info import ATTENTION_OP, META_KEY, info, symbol_of, token_dims

__all__ = ["AttentionCall", "Piece", "StepProgram", "lower_program"]

_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


@dataclass(frozen=True)
class AttentionCall:
    """What one captured attention call reads: the names of its q/k/v/cache/slot-mapping values and the
    step-wide metadata (replaced per nano-batch by a runner), and its constants."""

    q: str
    k: str
    v: str
    cache: str
    metadata: tuple[str, str, str, str]  # qo_indptr, kv_indptr, kv_indices, kv_last_page_len
    slot_mapping: str
    scaling: float
    sliding_window: int
    softcap: float
    backend: str
    kv_scale: str | None = None  # an FP8 cache's scales (`nanoflow_fx.ops.kv_quant`)

    def scale_of(self, env: Any) -> Any:
        """The value of `kv_scale` in `env` (None without one)."""
        return env[self.kv_scale] if self.kv_scale is not None else None


@dataclass(frozen=True)
class Piece:
    """One instruction of the program. `inputs`/`outputs` name values (captured graph nodes); `dims` give each
    value's token dimension (None: not per token, passed whole). A dense or collective piece runs
    `fn(*inputs) -> outputs`; an attention piece's `call` says what it reads. `whole`: the piece mixes tokens and
    must see all of them."""

    name: str
    kind: str  # "dense" | "attention" | "collective"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    whole: bool
    fn: Callable[..., Any] | None = None
    call: AttentionCall | None = None


@dataclass
class StepProgram:
    """The lowered step: pieces in order, the graph's inputs and outputs by name, each value's token dimension
    and symbolic size (SymInt values that depend on the token count are re-evaluated per nano-batch)."""

    placeholders: tuple[str, ...]
    pieces: tuple[Piece, ...]
    output: Any  # the captured graph's output structure, with value names in place of nodes
    token_dim: dict[str, int | None]
    symbolic: dict[str, sympy.Expr]  # SymInt-valued values: their expression
    token: sympy.Expr | None
    compiles: int = 0  # distinct dense pieces compiled (Inductor)

    @property
    def num_layers(self) -> int:
        return sum(p.kind == "attention" for p in self.pieces)

    @cached_property
    def schedule_key(self) -> tuple[tuple[str, str, bool, tuple[str, ...]], ...]:
        """What a Schedule of this program depends on: each piece's name, kind, wholeness and producer pieces."""
        producer = {out: p.name for p in self.pieces for out in p.outputs}
        return tuple((p.name, p.kind, p.whole, tuple(dict.fromkeys(producer[i] for i in p.inputs if i in producer)))
                     for p in self.pieces)


def lower_program(gm: GraphModule, example_inputs: Sequence[Any], inductor: bool) -> StepProgram:
    """Cut `gm` (the captured ATen graph, annotated: `passes.annotate`, run here if it was not) into pieces; with
    `inductor`, compile each distinct dense piece.

    `example_inputs` are AOT's fake (symbolic) inputs; it must run where AOT calls its forward compiler."""
    if not all(META_KEY in n.meta for n in gm.graph.nodes if n.op == "call_function"):
        annotate(gm)
    token = token_symbol(gm)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = tuple(n.name for n in gm.graph.find_nodes(op="placeholder"))
    parts: list[list[Node]] = [[]]
    reducing: Node | None = None  # an all-reduce whose wait is still to come: its piece is open
    for node in nodes:
        if node.op == "call_function" and node.target is ATTENTION_OP:
            parts.append([node])
            parts.append([])
        elif node.op == "call_function" and node.target is _ALL_REDUCE and reducing is None:
            parts.append([node])
            reducing = node
        else:
            parts[-1].append(node)
            if reducing is not None and node.target is _WAIT and node.args[0] is reducing:
                parts.append([])
                reducing = None
    parts = [p for p in parts if p]
    output_node = next(iter(gm.graph.find_nodes(op="output")))
    piece_of = {n: i for i, part in enumerate(parts) for n in part}
    used_later: dict[Node, int] = {}  # the last piece (or len(parts) for the output) reading each value
    for node in gm.graph.nodes:
        for arg in node.all_input_nodes:
            reader = piece_of.get(node, len(parts)) if node.op != "output" else len(parts)
            used_later[arg] = max(used_later.get(arg, -1), reader)

    token_dim: dict[str, int | None] = {}
    symbolic: dict[str, sympy.Expr] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        dims = token_dims(val, token) if token is not None else []
        token_dim[node.name] = dims[0] if dims else None
        expr = symbol_of(val)
        if expr is not None:
            symbolic[node.name] = expr

    compiler = PieceCompiler(example_inputs) if inductor else None
    pieces: list[Piece] = []
    layer = collectives = 0
    for i, part in enumerate(parts):
        inside = set(part)
        inputs = tuple(dict.fromkeys(a for n in part for a in n.all_input_nodes if a not in inside))
        outputs = tuple(n for n in part if used_later.get(n, -1) > i)
        whole = not all(_parallel(n) for n in part) or any(
            _crosses_without_token_dim(v, token_dim) for v in (*inputs, *outputs))
        if len(part) == 1 and part[0].target is ATTENTION_OP:
            pieces.append(Piece(f"L{layer}.attn", "attention", tuple(a.name for a in inputs),
                                tuple(o.name for o in outputs), whole, call=_attention_call(part[0])))
            layer += 1
            continue
        module = _piece_module(gm, part, inputs, outputs)
        fn: Callable[..., Any] = module
        if part[0].target is _ALL_REDUCE:  # (run as traced: nothing to fuse around one collective)
            pieces.append(Piece(f"C{collectives}", "collective", tuple(a.name for a in inputs),
                                tuple(o.name for o in outputs), whole, fn=fn))
            collectives += 1
            continue
        if compiler is not None:
            fn = compiler.compile(module, [a.meta.get("val") for a in inputs])
        pieces.append(Piece(f"P{len(pieces) - layer - collectives}", "dense", tuple(a.name for a in inputs),
                            tuple(o.name for o in outputs), whole, fn=fn))
    output = torch.fx.map_arg(output_node.args[0], lambda n: n.name)
    return StepProgram(placeholders, tuple(pieces), output, token_dim, symbolic, token,
                       compiler.compiles if compiler is not None else 0)


def _parallel(node: Node) -> bool:
    if node.op != "call_function":
        return True
    record = info(node)
    return not record.token_dependent or record.token_parallel


def _crosses_without_token_dim(node: Node, token_dim: dict[str, int | None]) -> bool:
    """A per-token value without a token dimension (e.g. flattened) cannot be sliced at a piece boundary."""
    if isinstance(node.meta.get("val"), torch.SymInt) or token_dim.get(node.name) is not None:
        return False
    return node.op == "call_function" and info(node).token_dependent


def _attention_call(node: Node) -> AttentionCall:
    args = list(node.args)  # (the op's arguments with defaults may come as keywords or not at all)
    if len(args) < 13:
        args.append(node.kwargs.get("backend", "torch"))
    if len(args) < 14:
        args.append(node.kwargs.get("kv_scale"))
    q, k, v, cache, qo, kvp, idx, last, slots = (cast(Node, a).name for a in args[:9])
    scaling, sliding_window, softcap = cast("tuple[float, int, float]", tuple(args[9:12]))  # the op's constants
    scale = args[13]
    return AttentionCall(q, k, v, cache, (qo, kvp, idx, last), slots, float(scaling), int(sliding_window),
                         float(softcap), str(args[12]), cast(Node, scale).name if scale is not None else None)


def _piece_module(gm: GraphModule, part: list[Node], inputs: Sequence[Node], outputs: Sequence[Node]) -> GraphModule:
    graph = Graph()
    env: dict[Node, Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in part:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    return GraphModule(gm, graph, class_name="StepPiece")

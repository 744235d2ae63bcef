"""Layer replication: trace the first periods of a model's repeated decoder layers and copy them for the others.

Dynamo and AOTAutograd spend their time per traced op, so tracing every layer of a deep model dominates a fresh
capture (benchmarks/RESULTS.md, first-token sections), although every layer runs the same code on its own weights
and KV cache. When the layers repeat with a period p (Llama: every layer alike, p = 1; Gemma-2's sliding/global
alternation: p = 2), nanoflow_fx traces the model with its layer list cut to the first T layers (T >= 3p, T = N
modulo p: the first period reads the prologue where later ones read their predecessor, so two more periods are
each checked against the one before) and extends the traced ATen graph to all N layers:

1. Each node is assigned to the layer it runs in: by Dynamo's `nn_module_stack` (the layer module it was traced
   in), or, for nodes without one (the fused-linear views our passes add), by the latest layer among its inputs.
   Nodes before the first layer's are the prologue (embedding, rotary tables), nodes after the last one's the
   epilogue (final norm, LM head). Graph inputs belong to layer j when their Dynamo source reads under
   `layers[j]`, `metadata.kv_caches[j]` or `metadata.kv_scales[j]`.
2. The traced layers are checked against each other: layer a + p must be layer a's graph node for node (same ops,
   same constants), reading layer a + p's own inputs where layer a reads its own, the same prologue values, and
   the values of earlier layers at the same distance. Otherwise nothing is replicated.
3. Layers T..N-1 are copies of the last traced period, inserted before the epilogue; each reads its own weights
   and cache through new graph inputs, whose sources are the template's with the layer index rewritten, and the
   values of the layers before it. The epilogue then reads layer N-1.

Which layers repeat is decided before tracing (`find_layer_stack`): same class and submodule classes, the same
attributes (but `layer_idx`) with equal values (parameter-free modules held as plain attributes, such as
transformers' per-layer kernel-function wrappers, compared by their own attributes), the same hooks, the same
parameter and buffer layout (shapes, strides, dtypes, which share a storage), the same attention configuration.
Layers alike in modules and parameters whose attributes differ are logged as a warning naming the attribute.
The result is the graph a full trace gives, up to node names; `optimize()` checks it against the eager model like
any capture, and any surprise (`NotReplicable`) falls back to tracing every layer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

__all__ = ["LayerStack", "NotReplicable", "expand", "find_layer_stack"]

log = logging.getLogger(__name__)

_MODEL, _METADATA = "L['model']", "L['metadata']"  # the step function's argument names, as Dynamo's sources say
_PROLOGUE, _EPILOGUE = -1, -2  # regions of nodes outside the layers (shared by all layers / after the last one)
_SMALL_TENSOR = 4096  # plain tensor attributes up to this many elements are compared by value, larger by identity
_MAX_DEPTH = 4  # modules held as plain attributes are compared by value this deep (then by identity)


class NotReplicable(Exception):
    """The traced layers are not copies of one another as replication needs; trace every layer instead."""


@dataclass
class LayerStack:
    """A model's `nn.ModuleList` of decoder layers that repeat with period `period`; the step is traced with the
    first `traced` of them (`truncated`) and `expand`ed to all."""

    parent: torch.nn.Module
    name: str  # the list's attribute on `parent`
    path: str  # the list's dotted path from the model
    layers: torch.nn.ModuleList
    period: int
    traced: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextmanager
    def truncated(self) -> Iterator[None]:
        """The model with only the first `traced` layers, for the trace."""
        self.parent._modules[self.name] = torch.nn.ModuleList(list(self.layers)[: self.traced])
        try:
            yield
        finally:
            self.parent._modules[self.name] = self.layers

    @contextmanager
    def whole(self) -> Iterator[None]:
        """All the layers again (inside `truncated`: to read the copied layers' inputs)."""
        current = self.parent._modules[self.name]
        self.parent._modules[self.name] = self.layers
        try:
            yield
        finally:
            self.parent._modules[self.name] = current

    def template(self, layer: int) -> int:
        """The traced layer that layer `layer` (>= traced) copies: the one of its phase in the last traced period."""
        return self.traced - self.period + (layer - self.traced) % self.period


def find_layer_stack(model: torch.nn.Module, attention: Sequence[Any]) -> LayerStack | None:
    """The model's decoder layers as a `LayerStack`, or None when replication would not save anything (too few
    layers, no period) or they cannot be found (a list of one module per attention layer, layer i holding the
    attention with `layer_idx` i). `attention`: each layer's attention configuration (`discover_layers`)."""
    n = len(attention)
    for path, module in model.named_modules():
        if not (isinstance(module, torch.nn.ModuleList) and len(module) == n and n > 2 and path):
            continue
        if not all(_indexed(layer, i) for i, layer in enumerate(module)):
            continue
        structures = [_structure(layer, attention[i]) for i, layer in enumerate(module)]
        signatures = [(structures[i], _attributes(layer, i)) for i, layer in enumerate(module)]
        period = _period(signatures)
        if period is None:
            alike = _period(structures)
            if alike is None:
                log.info("nanoflow_fx: the layers of %s do not repeat; every layer is traced", path)
            else:  # same modules and parameters, yet an attribute differs: a model this should have served
                i = next(i for i in range(n) if signatures[i] != signatures[i % alike])
                log.warning("nanoflow_fx: layers %d and %d of %s have the same modules and parameters but differ in "
                            "%s, so every layer is traced (slower optimize(), same results); if that attribute "
                            "does not change what the layer computes, please report it", i % alike, i, path,
                            _first_difference(signatures[i % alike][1], signatures[i][1]))
            return None
        traced = 3 * period + (n - 3 * period) % period  # two periods checked against their predecessors
        if traced >= n:
            return None
        parent_path, _, name = path.rpartition(".")
        return LayerStack(model.get_submodule(parent_path), name, path, module, period, traced)
    return None


def _indexed(layer: torch.nn.Module, index: int) -> bool:
    indices = [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return bool(indices) and all(i == index for i in indices)


def _period(signatures: Sequence[Any]) -> int | None:
    """The smallest p <= n/2 with signatures[i] == signatures[i % p] for every i, or None."""
    n = len(signatures)
    return next((p for p in range(1, n // 2 + 1) if all(signatures[i] == signatures[i % p] for i in range(n))), None)


def _structure(layer: torch.nn.Module, attention: Any) -> list[Any]:
    """The layer's attention configuration, module classes and parameter/buffer layout (shapes, strides, dtypes,
    which share a storage)."""
    parts: list[Any] = [repr(attention)]
    storages: dict[int, int] = {}
    for name, t in itertools.chain(layer.named_parameters(remove_duplicate=False),
                                   layer.named_buffers(remove_duplicate=False)):
        storage = storages.setdefault(t.untyped_storage().data_ptr(), len(storages))
        parts.append((name, type(t).__name__, tuple(t.shape), t.stride(), str(t.dtype), str(t.device),
                      t.storage_offset(), storage, t.requires_grad))
    parts.extend((path, type(m).__module__, type(m).__qualname__) for path, m in layer.named_modules(
        remove_duplicate=False))
    return parts


def _attributes(layer: torch.nn.Module, index: int) -> list[Any]:
    """Every other attribute of the layer's modules, by value (`_value_key`), but its own `layer_idx`."""
    return [(path, key, value) for path, module in layer.named_modules(remove_duplicate=False)
            for key, value in _module_state(module, index)]


def _module_state(module: torch.nn.Module, index: int | None, depth: int = 0) -> list[tuple[str, Any]]:
    """(attribute, `_value_key`) for a module's attributes other than its parameters, buffers and submodules."""
    state = []
    for key, value in sorted(vars(module).items()):
        if key in ("_parameters", "_buffers", "_modules") or (key == "layer_idx" and value == index):
            continue
        if "hooks" in key and isinstance(value, dict):  # keyed by handle ids, unique per registration
            value = list(value.values())
        state.append((key, _value_key(value, depth)))
    return state


def _first_difference(a: list[Any], b: list[Any]) -> str:
    """The first (module path, attribute) at which two `_attributes` lists differ, for the log."""
    for x, y in itertools.zip_longest(a, b):
        if x != y:
            path, key = (x or y)[:2]
            return f"`{path + '.' if path else ''}{key}`"
    return "nothing"


def _value_key(value: Any, depth: int = 0) -> Any:
    """A comparable stand-in for an attribute: equal for equal plain values; a module held as a plain attribute
    (not a submodule; e.g. transformers' per-layer kernel-function wrappers) by its class and its own attributes'
    values; other objects by identity."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [_value_key(v, depth) for v in value]
        return (type(value).__name__, sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items)
    if isinstance(value, dict):
        return ("dict", sorted(((repr(k), _value_key(v, depth)) for k, v in value.items()), key=repr))
    if isinstance(value, torch.Tensor):
        if value.numel() <= _SMALL_TENSOR and value.device.type != "meta":
            data = value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            return ("tensor", tuple(value.shape), str(value.dtype), hashlib.sha256(data).hexdigest())
        return ("tensor", id(value))
    if isinstance(value, functools.partial):  # e.g. an activation's partial(gelu, approximate=...), one per layer
        return ("partial", _value_key(value.func, depth), _value_key(value.args, depth),
                _value_key(value.keywords, depth))
    if isinstance(value, torch.nn.Module) and depth < _MAX_DEPTH and not value._parameters and not value._buffers:
        # (one with weights of its own is a layer's state: identity, as before)
        modules = [(k, _value_key(m, depth + 1)) for k, m in value._modules.items()]
        return ("module", id(type(value)), _module_state(value, None, depth + 1), modules)
    return ("object", type(value).__qualname__, id(value))


def _owner_pattern(path: str) -> re.Pattern[str]:
    """Matches a Dynamo source reading under `layers[j]` (both of Dynamo's spellings), capturing j."""
    parts = "".join(rf"(?:\._modules\['{re.escape(p)}'\]|\.{re.escape(p)})" for p in path.split("."))
    return re.compile(rf"^{re.escape(_MODEL)}{parts}(?P<index>\._modules\['(?P<a>\d+)'\]|\[(?P<b>\d+)\])(?=[.\[]|$)")


# a layer's KV cache, or its FP8 scales
_CACHE = re.compile(rf"^{re.escape(_METADATA)}\.kv_(?:caches|scales)(?P<index>\[(?P<b>\d+)\])(?=[.\[]|$)")


def _source_owner(source: str, pattern: re.Pattern[str]) -> tuple[int, Callable[[int], str]] | None:
    """(j, source for layer i) if `source` reads layer j's weights or KV cache, else None."""
    for p in (pattern, _CACHE):
        m = p.match(source)
        if m is not None:
            start, end = m.span("index")
            head, index, tail = source[:start], m.group("index"), source[end:]
            return int(m.groupdict().get("a") or m.group("b")), (
                lambda i, head=head, index=index, tail=tail: head + re.sub(r"\d+", str(i), index) + tail)
    return None


def _stack_layer(node: Node, pattern: re.Pattern[str]) -> int | None:
    """The layer whose module `node` was traced in, _PROLOGUE for a node traced outside every layer, None for a
    node without a module stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for entry in stack.values():
        m = pattern.match(entry[0] if isinstance(entry, tuple) else str(entry))
        if m is not None:
            return int(m.group("a") if m.group("a") is not None else m.group("b"))
    return _PROLOGUE


def _module_pattern(path: str) -> re.Pattern[str]:
    """Matches an nn_module_stack path inside layer j (`L['model'].model.layers.3...`), capturing j."""
    return re.compile(rf"^{re.escape(_MODEL)}\.{re.escape(path)}(?:\.(?P<a>\d+)|\[(?P<b>\d+)\])(?=[.\[]|$)")


def expand(stack: LayerStack, gm: GraphModule, sources: Sequence[str | None],
           read: Callable[[list[str]], list[Any]]) -> tuple[list[str], list[Node], list[Any]]:
    """Extend `gm`, traced with the first `stack.traced` layers, to all of them, in place (see the module docs).

    `sources`: Dynamo's source of each of `gm`'s inputs; `read(sources)`: those sources' values in the call
    being traced. Returns the sources of the inputs added (after the existing ones, in order), for each the
    traced input it copies (its fake value serves the lowering), and their values in the call. Raises
    `NotReplicable`.
    """
    n, traced, period = stack.num_layers, stack.traced, stack.period
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(sources) or any(s is None for s in sources):
        raise NotReplicable("an input without a Dynamo source")
    owners = _source_pattern_owners(stack.path, placeholders, sources)
    region: dict[Node, int] = {p: owners[p][0] if p in owners else _PROLOGUE for p in placeholders}
    module_pattern = _module_pattern(stack.path)
    nodes = [x for x in graph.nodes if x.op not in ("placeholder", "output")]
    layer_of = {x: _stack_layer(x, module_pattern) for x in nodes}
    layers_of_nodes = (layer_of[x] for x in nodes)
    inside = [i for i, layer in enumerate(layers_of_nodes) if (layer if layer is not None else _PROLOGUE) >= 0]
    if not inside:
        raise NotReplicable("no node was traced inside the decoder layers")
    last = inside[-1]
    for i, x in enumerate(nodes):
        flow, layer = max((region[a] for a in x.all_input_nodes), default=_PROLOGUE), layer_of[x]
        if i > last:
            region[x] = _EPILOGUE
        elif flow == _PROLOGUE and isinstance(x.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):
            # A size computed from the step's sizes alone (say tokens x experts per token): traced once, in the
            # first layer that needs it, and reused by the others.
            region[x] = _PROLOGUE
        elif layer is not None and layer >= 0:
            if flow > layer:
                raise NotReplicable(f"{x.name}, in layer {layer}, reads layer {flow}")
            region[x] = layer
        else:
            region[x] = flow  # our passes' nodes, or model code between layers: where their inputs are
    layers: list[list[Node]] = [[] for _ in range(traced)]
    for x in nodes:
        if region[x] >= traced:
            raise NotReplicable(f"{x.name} runs in layer {region[x]}, beyond the {traced} traced")
        if region[x] >= 0:
            layers[region[x]].append(x)
    owned: list[list[Node]] = [[] for _ in range(traced)]
    for p, (j, _) in owners.items():
        if j >= traced:
            raise NotReplicable(f"input {p.name} reads layer {j}, beyond the {traced} traced")
        owned[j].append(p)
    if any(not nodes_j for nodes_j in layers):
        raise NotReplicable("a traced layer has no nodes")

    # iso[a]: layer a's nodes and inputs -> layer a+p's, checked node for node.
    by_source = {s: p for p, s in zip(placeholders, sources)}
    iso: list[dict[Node, Node]] = []
    for a in range(traced - period):
        m: dict[Node, Node] = {}
        for p in owned[a]:
            twin = by_source.get(owners[p][1](a + period))
            if twin is None:
                raise NotReplicable(f"layer {a + period} has no input like layer {a}'s {p.name}")
            m[p] = twin
        iso.append(m)

        def agree(u: Node, v: Node, a: int = a, m: dict[Node, Node] = m) -> bool:
            r = region[u]
            if r > a:
                raise NotReplicable(f"layer {a} reads layer {r}")
            if r >= 0:
                return (m if r == a else iso[r])[u] is v
            # The first period reads the prologue's output where the next period reads the layer before it.
            return u is v or (a < period and u.op != "placeholder" and region[v] >= 0)

        if len(layers[a]) != len(layers[a + period]):
            raise NotReplicable(f"layers {a} and {a + period} differ in length")
        for x, y in zip(layers[a], layers[a + period]):
            if x.op != y.op or x.target != y.target or not _same(x.args, y.args, agree) or not _same(
                    x.kwargs, y.kwargs, agree):
                raise NotReplicable(f"layers {a} and {a + period} differ at {x.name} / {y.name}")
            m[x] = y

    # Layers traced..n-1: copies of the last traced period, before the epilogue.
    first_after = next((x for x in nodes if region[x] == _EPILOGUE), graph.output_node())
    env: dict[int, dict[Node, Node]] = {}

    def counterpart(u: Node, s: int, j: int) -> Node:
        """Layer j's node for layer s's `u` (j - s a multiple of the period)."""
        stop = j if j < traced else stack.template(j)
        while s < stop:
            u, s = iso[s][u], s + period
        return u if j < traced else env[j][u]

    added: list[str] = []
    templates: list[Node] = []
    last_input = placeholders[-1]
    for i in range(traced, n):
        t = stack.template(i)
        e = env[i] = {}
        for p in owned[t]:
            with graph.inserting_after(last_input):
                last_input = graph.placeholder(f"{p.name}_layer{i}")
            last_input.meta = dict(p.meta)
            e[p] = last_input
            added.append(owners[p][1](i))
            templates.append(p)

        def remap(u: Node, i: int = i, t: int = t, e: dict[Node, Node] = e) -> Node:
            r = region[u]
            if r < 0:
                return u
            if r > t:
                raise NotReplicable(f"layer {t} reads layer {r}")
            return e[u] if r == t else counterpart(u, r, i - (t - r))

        for x in layers[t]:
            with graph.inserting_before(first_after):
                e[x] = graph.node_copy(x, remap)
            _relabel(e[x], i, module_pattern)
    for x in [*(x for x in nodes if region[x] == _EPILOGUE), graph.output_node()]:
        def remap_epilogue(u: Node) -> Node:
            r = region[u]
            return u if r < 0 else counterpart(u, r, r + n - traced)

        x.args = map_aggregate(x.args, lambda v: remap_epilogue(v) if isinstance(v, Node) else v)
        x.kwargs = map_aggregate(x.kwargs, lambda v: remap_epilogue(v) if isinstance(v, Node) else v)
    values = _check_inputs(templates, added, sources, placeholders, read)
    graph.lint()
    gm.recompile()
    return added, templates, values


def _relabel(node: Node, layer: int, pattern: re.Pattern[str]) -> None:
    """A copied node's module stack names the layer it now runs in (not the template's)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return

    def path(p: str) -> str:
        m = pattern.match(p)
        if m is None:
            return p
        group = "a" if m.group("a") is not None else "b"
        return p[: m.start(group)] + str(layer) + p[m.end(group):]

    node.meta["nn_module_stack"] = {
        key: (path(value[0]), *value[1:]) if isinstance(value, tuple) else value for key, value in stack.items()}


def _source_pattern_owners(path: str, placeholders: Sequence[Node],
                           sources: Sequence[str | None]) -> dict[Node, tuple[int, Callable[[int], str]]]:
    pattern = _owner_pattern(path)
    owners = {}
    for p, s in zip(placeholders, sources):
        owner = _source_owner(s, pattern) if s is not None else None
        if owner is not None:
            owners[p] = owner
    return owners


def _same(a: Any, b: Any, agree: Callable[[Node, Node], bool]) -> bool:
    """Whether two nodes' arguments agree: nodes as `agree` says, everything else equal (type and value)."""
    if isinstance(a, Node):
        return isinstance(b, Node) and agree(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, agree) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k], agree) for k in a))
    if isinstance(a, slice):
        return isinstance(b, slice) and _same((a.start, a.stop, a.step), (b.start, b.stop, b.step), agree)
    return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN constants are equal here


def _check_inputs(templates: Sequence[Node], added: Sequence[str], sources: Sequence[str | None],
                  placeholders: Sequence[Node], read: Callable[[list[str]], list[Any]]) -> list[Any]:
    """Each added input must hold what its template holds, laid out alike (the signature promised it)."""
    source_of = dict(zip(placeholders, sources))
    try:
        new = read(list(added))
        old = read([source_of[p] for p in templates])  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - a rewritten source that does not evaluate
        raise NotReplicable(f"a copied layer's inputs cannot be read ({type(e).__name__}: {e})") from e
    for source, a, b in zip(added, old, new):
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and (a.shape, a.stride(), a.dtype, a.device, a.storage_offset()) == (
                b.shape, b.stride(), b.dtype, b.device, b.storage_offset())
        else:
            same = type(a) is type(b)
        if not same:
            raise NotReplicable(f"{source} does not match the traced layer's input")
    return new

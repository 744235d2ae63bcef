"""Tensor parallelism: a model transformers loaded with its TP plan, made into plain local shards whose forwards
call traceable functional collectives.

transformers (`from_pretrained(..., tp_plan="auto")` under torchrun) shards each planned parameter as a DTensor
and replaces the module's `forward` with its own wrapper (DTensor redistributions). `localize` turns that into
what a captured step can hold:

- every DTensor parameter becomes a plain `nn.Parameter` of this rank's shard (`to_local()`): the step key, the
  layer replication and the fused linears see ordinary tensors;
- each planned module gets a forward of its own, by style (transformers' style names):

      colwise                 y_local = x @ W_local.T (+ b_local)                 no communication
      rowwise                 y = all_reduce(x_local @ W_local.T) (+ b, once)     after o_proj, down_proj
      embedding_rowwise       y = all_reduce(E_local[ids - start] masked to the rank's vocabulary rows)
      colwise_gather_output   y = all_gather(x @ W_local.T) over the last dim     the LM head (on the sampled rows
                                                                                  only: `logits_to_keep` slices first)
      replicated_with_grad_allreduce, all_reduce-free replicated styles: the module's own forward

  Collectives are `torch.distributed._functional_collectives` (Dynamo traces them into the step graph as
  `_c10d_functional.all_reduce` + `wait_tensor`).
- a plan whose attention heads do not divide by the TP size (e.g. 2 KV heads on 4 ranks, whose colwise shards
  would cut heads in half) or a style this module does not implement raises `UnsupportedModelError` naming it.

The model is changed in place and stays so (its plain forward is correct on every rank, in lockstep); the
record (`TensorParallel`) is kept on the model, so a later `optimize()` finds it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nanoflow_fx.errors import UnsupportedModelError

__all__ = ["TensorParallel", "distribute_by_plan", "localize", "tensor_parallel_of", "vocab_size"]

log = logging.getLogger(__name__)

_RECORD = "_nanoflow_tensor_parallel"  # the model's `TensorParallel` (in its __dict__)
# Styles that need nothing at inference but the local (= whole, replicated) parameter.
_REPLICATED = {"replicated_with_grad_allreduce", "sequence_parallel_replicated"}
_STYLES = {"colwise", "rowwise", "embedding_rowwise", "colwise_gather_output", "colwise_rep", *_REPLICATED}
_HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class TensorParallel:
    """The TP group a localized model's collectives run over, and what was localized.

    `styles`: (module name, style) for each planned module, in module order. `vocab_rows`: the full vocabulary
    (the embedding's and LM head's rows across ranks)."""

    group_name: str
    rank: int
    world_size: int
    styles: tuple[tuple[str, str], ...]
    vocab_rows: int

    @property
    def group(self) -> Any:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(cast(Any, self.group_name))

    @property
    def key(self) -> dict[str, Any]:
        """What a step captured on this rank depends on (part of the lowering's key): the rank, the world, the
        plan and the group's name (baked into the graph's collectives)."""
        plan = hashlib.sha256(json.dumps(self.styles).encode()).hexdigest()[:16]
        return {"rank": self.rank, "world_size": self.world_size, "plan": plan, "group": self.group_name}


def tensor_parallel_of(model: nn.Module) -> TensorParallel | None:
    """The model's TP record (`localize` made it), or None for a model on one device."""
    return model.__dict__.get(_RECORD)


def vocab_size(model: Any) -> int:
    """The model's full vocabulary (its logits' width), whether or not its embedding is sharded."""
    tp = tensor_parallel_of(model)
    if tp is not None:
        return tp.vocab_rows
    return int(model.get_input_embeddings().weight.shape[0])


def localize(model: Any) -> TensorParallel | None:
    """Make a TP-loaded model's parameters plain local shards with functional collectives (module docstring);
    returns its record, or None if the model has no DTensor parameter (and was never localized)."""
    record = tensor_parallel_of(model)
    if record is not None:
        return record
    sharded: list[tuple[str, Any]] = [(n, p) for n, p in model.named_parameters() if _is_dtensor(p)]
    if not sharded:
        return None
    mesh = sharded[0][1].device_mesh
    if mesh.ndim != 1 or any(p.device_mesh != mesh for _, p in sharded):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s parameters are sharded over a {mesh.ndim}-D or mixed device mesh; nanoflow_fx "
            "takes tensor parallelism over one TP mesh (DistributedConfig(tp_size=N), no FSDP, EP or head "
            "replication)")
    plan = _plan_of(model)
    group = mesh.get_group()
    world, rank = mesh.size(), mesh.get_local_rank()
    styles = _planned_modules(model, plan)
    _check_styles(model, styles)
    _check_heads(model, styles, world)
    vocab = int(model.get_input_embeddings().weight.shape[0])  # (the DTensor's global shape)
    for _, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if _is_dtensor(param):
                module._parameters[name] = nn.Parameter(param.to_local(), requires_grad=param.requires_grad)
    for name, style in styles:
        _install(model.get_submodule(name), style, group.group_name, world)
    record = TensorParallel(group.group_name, rank, world, tuple(styles), vocab)
    model.__dict__[_RECORD] = record
    log.info("nanoflow_fx: tensor parallel rank %d of %d: %d modules localized", rank, world, len(styles))
    return record


def distribute_by_plan(model: Any, mesh: Any) -> Any:
    """Shard a model built in code (random weights, or on the meta device) over the 1-D TP `mesh` as transformers'
    TP plan shards a checkpoint it loads: each planned parameter a DTensor of its style's placement (colwise and
    the vocabulary: rows; rowwise: columns, its bias replicated), every rank slicing its own shard of its full
    tensor (no communication: build the same weights on every rank). For benchmarks and tests of shapes no
    checkpoint exists for; `from_pretrained(..., tp_plan="auto")` is the way to load a real model. Returns it."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    styles = _planned_modules(model, _plan_of(model))
    _check_styles(model, styles)
    for name, style in styles:
        module = model.get_submodule(name)
        for pname, param in list(module.named_parameters(recurse=False)):
            rows = style != "rowwise" and style not in _REPLICATED
            placement = Shard(0) if rows else Shard(1) if style == "rowwise" and pname == "weight" else Replicate()
            module._parameters[pname] = nn.Parameter(
                distribute_tensor(param.data, mesh, [placement], src_data_rank=None), requires_grad=False)
    return model


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor)


def _plan_of(model: nn.Module) -> dict[str, str]:
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None)
    if not plan:
        raise UnsupportedModelError(f"{type(model).__name__} has DTensor parameters but no TP plan (`model.tp_plan`); "
                                    "load it with from_pretrained(..., tp_plan='auto') under torchrun")
    return dict(plan)


def _planned_modules(model: nn.Module, plan: dict[str, str]) -> list[tuple[str, str]]:
    """(module name, style) for every module the plan names (its `*` matching layer numbers)."""
    from transformers.distributed.tensor_parallel import replace_layer_number_by_wildcard

    out = []
    for name, _ in model.named_modules():
        style = plan.get(replace_layer_number_by_wildcard(name)) if name else None
        if style is not None:
            out.append((name, style))
    return out


def _check_styles(model: nn.Module, styles: list[tuple[str, str]]) -> None:
    unknown = sorted({(s, n) for n, s in styles if s not in _STYLES})
    if unknown:
        style, name = unknown[0]
        raise UnsupportedModelError(
            f"{type(model).__name__}'s TP plan shards {name} as {style!r}, which nanoflow_fx does not run (it runs "
            f"{sorted(_STYLES)}); load the model without tp_plan, or with a plan of those styles")
    for name, style in styles:
        module = model.get_submodule(name)
        linear = style in ("colwise", "rowwise", "colwise_gather_output", "colwise_rep")
        if linear and not isinstance(module, nn.Linear) or style == "embedding_rowwise" and not isinstance(
                module, nn.Embedding):
            raise UnsupportedModelError(f"the TP plan shards {name} ({type(module).__name__}) as {style!r}: "
                                        "nanoflow_fx runs that style on nn.Linear / nn.Embedding modules only")


def _check_heads(model: Any, styles: list[tuple[str, str]], world: int) -> None:
    """Colwise q/k/v projections must hold whole heads, as many per rank: else a shard cuts a head in two."""
    if not any(n.rsplit(".", 1)[-1] in _HEAD_PROJECTIONS and s == "colwise" for n, s in styles):
        return
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count % world:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {what}={count}, which does not divide by the tensor-parallel size "
                f"{world}: its plan's colwise q/k/v shards would cut attention heads apart; use a TP size that "
                f"divides {count} (e.g. {math.gcd(count, world)}), or serve replicas of the model instead")


def _install(module: nn.Module, style: str, group: Any, world: int) -> None:
    """Give `module` the local forward of `style`: its class becomes a subclass whose forward runs the shard with
    its collectives (one class per original class and style, so repeated layers stay alike for the layer
    replication), its TP parameters an attribute. transformers' own wrapper (an instance `forward`) is dropped."""
    module.__dict__.pop("forward", None)  # transformers' wrapper (DTensor redistributions)
    forward = _FORWARDS.get(style)
    if forward is None:  # colwise (the local GEMM is the shard's output), replicated styles
        return
    base = type(module)
    key = (base, style)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{base.__name__}TP_{style}", (base,), {"forward": forward, "__module__": __name__})
    rows = int(cast(torch.Tensor, module.weight).shape[0])  # (local, after to_local)
    if style == "embedding_rowwise":  # torch's Shard(0) chunks: the first ranks hold ceil(V / N) rows each
        from torch.distributed.distributed_c10d import _resolve_process_group

        full = int(getattr(module, "num_embeddings", rows))
        start = torch.distributed.get_rank(_resolve_process_group(group)) * math.ceil(full / world)
        cast(Any, module).num_embeddings = rows  # (the local table)
    else:
        full = int(getattr(module, "out_features", rows))
        start = 0
    # What the forward reads, as plain values (the layer replication compares layers' attributes by value).
    attrs = cast(Any, module)
    attrs.nanoflow_tp_group, attrs.nanoflow_tp_world = str(group), world
    attrs.nanoflow_tp_start, attrs.nanoflow_tp_rows, attrs.nanoflow_tp_full = start, rows, full
    module.__class__ = _CLASSES[key]


_CLASSES: dict[tuple[type, str], type] = {}


def _rowwise_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """x_local [..., in/N] @ W_local.T summed over ranks, then the (replicated) bias once."""
    from torch.distributed import _functional_collectives as funcol

    y = funcol.all_reduce(F.linear(x, self.weight), "sum", self.nanoflow_tp_group)
    return y if self.bias is None else y + self.bias


def _vocab_parallel_embedding_forward(self: Any, ids: torch.Tensor) -> torch.Tensor:
    """Rows [start, start + rows) of the vocabulary live on this rank; other ids look up row 0 and are zeroed
    before the all-reduce. The module's own forward runs the lookup (a scaled embedding keeps its scale: linear)."""
    from torch.distributed import _functional_collectives as funcol

    start = self.nanoflow_tp_start
    outside = (ids < start) | (ids >= start + self.nanoflow_tp_rows)
    y = super(type(self), self).forward((ids - start).masked_fill(outside, 0))
    return funcol.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0), "sum", self.nanoflow_tp_group)


def _gathered_colwise_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """The local columns of every rank concatenated along the last dim (shards padded to ceil(out / N) for the
    all-gather, the padding dropped after)."""
    from torch.distributed import _functional_collectives as funcol

    world, full = self.nanoflow_tp_world, self.nanoflow_tp_full
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # (the newer name, torch 2.13)
    width = math.ceil(full / world)
    y = super(type(self), self).forward(x)  # [..., local]
    lead = y.shape[:-1]
    y = y.reshape(-1, y.shape[-1])
    if y.shape[-1] != width:
        y = F.pad(y, (0, width - y.shape[-1]))
    gathered = gather(y.contiguous(), 0, self.nanoflow_tp_group)  # [N * rows, width]
    y = gathered.view(world, -1, width).permute(1, 0, 2).reshape(-1, world * width)[:, :full]
    return y.reshape(*lead, full)


_FORWARDS = {"rowwise": _rowwise_forward, "embedding_rowwise": _vocab_parallel_embedding_forward,
             "colwise_gather_output": _gathered_colwise_forward, "colwise_rep": _gathered_colwise_forward}


def check_collectives(gm: torch.fx.GraphModule, example_inputs: Any) -> int:
    """Pass `tensor_parallel` (stage "dynamo"): a TP rank's step must hold the plan's collectives.

    Requires: Dynamo's graph of a localized model (`localize`). Ensures: the graph is unchanged and has at least
    one functional collective (an all-reduce after each row-wise projection and the vocabulary-parallel embedding,
    the LM head's all-gather); raises otherwise (the model's forwards were replaced after `localize`). Returns
    how many collectives it has."""
    found = sum(1 for node in gm.graph.nodes if node.op == "call_function" and _is_collective(node.target))
    if not found:
        raise UnsupportedModelError("the captured step of a tensor-parallel model has no collective: its modules' "
                                    "forwards were replaced after nanoflow_fx localized them")
    return found


def _is_collective(target: Any) -> bool:
    name = getattr(target, "__module__", "") or ""
    qualified = str(target)
    return "_functional_collectives" in name or "_c10d_functional" in qualified

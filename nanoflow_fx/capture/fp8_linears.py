"""Pass `fp8_linears`: each FP8 linear of the step becomes a per-token activation quantisation and one FP8 GEMM.

Requires: Dynamo's graph (stage "dynamo", after `fuse_linears`), in which each FP8 linear is one
`nanoflow::fp8_linear(x, weight, weight_scale, bias)` call (`capture.fp8_weights.Fp8Linear`; fused groups read a
view spanning their weights and scales).
Ensures: no `fp8_linear` call is left. Each distinct input `x` of FP8 linears is quantised once, per token
(`ops.fp8.quantize_rows`: a row amax, the scale, a divide, a clamp and a cast, in plain torch ops), and each
linear is one `torch._scaled_mm` of the quantised rows and its FP8 weight with row-wise scales, in the model's
dtype, its bias added after (`ops.fp8.scaled_linear`). The weights and scales stay the graph inputs they were: no
weight is copied, and replicated layers read their own.

    before: %y = nanoflow.fp8_linear(%x, %w, %w_scale, None)                           # x [1, T, K], w [N, K]
    after:  %q = _quantize_input(%x); %x_q = %q[0]; %x_scale = %q[1]                  # [T, K] e4m3, [T, 1] fp32
            %y = _fp8_gemm(%x, %x_q, %x_scale, %w, %w_scale, None, use_fast_accum)    # [1, T, N]

The quantisation's ops come straight after the op that produced `x` (the RMSNorm before Q/K/V and gate/up, the
SiLU-and-multiply before the down projection), so Inductor fuses them into that op's kernel: the quantised
activations are written instead of the model-dtype ones, with no pass over memory of their own. (The input of the
output projection is the attention op's output: its quantisation is a kernel of its own, at the start of the next
piece.) Why on Dynamo's graph, not AOT's: the new ops are then traced to ATen by AOT like the model's own (their fake
values and shapes, Inductor's decompositions), and layer replication, which runs on the ATen graph, copies the
lowered layers as it copies any other (each copy reading its own FP8 weights and scales through its own inputs).
An "aten" pass would have to build the ATen ops' metadata itself, and run once per layer after replication.

`use_fast_accum`: `torch._scaled_mm`'s fast accumulation (the FP8 tensor cores' own accumulator, no
periodic promotion to fp32: faster, less accurate over long sums; ignored on the CPU).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.ops.fp8 import fp8_linear, quantize_rows, scaled_linear

__all__ = ["FP8_LINEAR_TARGETS", "lower_fp8_linears"]

log = logging.getLogger(__name__)

FP8_LINEAR_TARGETS = (fp8_linear, torch.ops.nanoflow.fp8_linear, torch.ops.nanoflow.fp8_linear.default)
_META = ("nn_module_stack", "source_fn_stack", "stack_trace")  # where a node came from (replication reads the first)


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [..., K] as token rows [T, K], quantised per row: (e4m3 [T, K], fp32 scales [T, 1])."""
    return quantize_rows(x.reshape(-1, x.shape[-1]))


def _fp8_gemm(x: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              weight_scale: torch.Tensor, bias: torch.Tensor | None, use_fast_accum: bool) -> torch.Tensor:
    """The linear of `x` [..., K] (its quantised rows `x_q`, `x_scale`) -> [..., N] in `x`'s dtype."""
    out = scaled_linear(x_q, x_scale, weight, weight_scale, bias, x.dtype, use_fast_accum)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _arguments(node: Node) -> tuple[Any, Any, Any, Any]:
    names = ("x", "weight", "weight_scale", "bias")
    args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args):]]
    return args[0], args[1], args[2], args[3]


def lower_fp8_linears(gm: GraphModule, example_inputs: Sequence[Any], use_fast_accum: bool = True) -> int:
    """Lower, in place, every `nanoflow::fp8_linear` call of Dynamo's graph `gm` (see the module docs); returns
    how many."""
    graph = gm.graph
    quantized: dict[Node, tuple[Node, Node]] = {}  # input -> its quantised rows and their scales
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FP8_LINEAR_TARGETS:
            continue
        x, weight, weight_scale, bias = _arguments(node)
        meta = {k: node.meta[k] for k in _META if k in node.meta}
        if x not in quantized:
            with graph.inserting_before(node):
                rows = graph.call_function(_quantize_input, (x,))
                quantized[x] = (graph.call_function(operator.getitem, (rows, 0)),
                                graph.call_function(operator.getitem, (rows, 1)))
            for n in (rows, *quantized[x]):
                n.meta.update(meta)
        x_q, x_scale = quantized[x]
        with graph.inserting_before(node):
            out = graph.call_function(_fp8_gemm, (x, x_q, x_scale, weight, weight_scale, bias, use_fast_accum))
        out.meta.update(meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        lowered += 1
    if lowered:
        gm.recompile()
        log.debug("nanoflow lowered %d FP8 linears (%d distinct inputs quantised)", lowered, len(quantized))
    return lowered

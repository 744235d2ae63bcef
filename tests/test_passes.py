"""Unit and structural tests of the passes: annotate, group_ops, split_nanobatches, assign_units."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch.fx import GraphModule, Node

from nanoflow_fx.ops.split_metadata import split_attention_metadata
from nanoflow_fx.passes import (
    NanobatchPlan,
    annotate,
    assign_units,
    group_names,
    group_ops,
    info,
    split_nanobatches,
    splittable_groups,
)
from nanoflow_fx.runtime.schedule_executor import ScheduleExecutor
from nanoflow_fx.schedule import ScheduleError, validate
from tests.conftest import optimized
from tests.test_generate_parity import _left_padded_batch
from tests.toy_graph import capture_toy, toy_inputs

TOY_ROLES = ["T", "x", "w", "cache", "R1", "qo", "R1b", "kvp", "P", "kvi", "R", "last", "slots"]


def _render(gm: GraphModule, roles: list[str]) -> list[str]:
    """Each call as `op(args)`, placeholders by role, earlier calls as %index: a readable exact form."""
    names: dict[Node, str] = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        names[node] = roles[i] if i < len(roles) else node.name
    lines = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = torch.fx.map_arg(node.args, lambda n: names[n])
        names[node] = f"%{len(lines)}"
        lines.append(f"{str(node.target).split('.')[-2]}({', '.join(map(str, args))})".replace("'", ""))
    return lines


def test_toy_graph_annotation_and_groups() -> None:
    gm = group_ops(annotate(capture_toy()))
    by_name = {n.name: info(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert by_name["mm"].op_class == "gemm" and by_name["mm"].token_parallel and by_name["mm"].token_dim == 0
    assert by_name["paged_attention"].op_class == "attention" and by_name["paged_attention"].token_parallel
    assert not by_name["cumsum"].token_parallel and "cumsum" in by_name["cumsum"].why_not_parallel
    assert by_name["mm"].flops != 0  # 2 * T * 4 * 4, symbolic in T
    assert group_names(gm) == ["L0.qkv", "L0.attn", "L0.mix"]
    assert splittable_groups(gm) == ["L0.qkv", "L0.attn"]


def test_toy_graph_split_is_exactly_the_expected_graph() -> None:
    gm = group_ops(annotate(capture_toy()))
    split = split_nanobatches(gm, NanobatchPlan.uniform(["L0.qkv", "L0.attn"], (0, 2, 6)))
    roles = TOY_ROLES + [f"nb{i}.{f}" for i in (0, 1) for f in ("qo", "kvp", "kvi", "last")]
    assert _render(split, roles) == [
        "slice(x, 0, 0, 2)", "mm(%0, w)",  # nano-batch 0 reads token rows [0, 2) ...
        "slice(x, 0, 2, 6)", "mm(%2, w)",  # ... nano-batch 1 rows [2, 6); the weight is shared, not copied
        "relu(%1)", "relu(%3)",
        "view(%4, [-1, 1, 4])", "view(%5, [-1, 1, 4])",
        "slice(slots, 0, 0, 2)",
        "paged_attention(%6, %6, %6, cache, nb0.qo, nb0.kvp, nb0.kvi, nb0.last, %8, 0.5, 0, 0.0)",
        "slice(slots, 0, 2, 6)",
        "paged_attention(%7, %7, %7, cache, nb1.qo, nb1.kvp, nb1.kvi, nb1.last, %10, 0.5, 0, 0.0)",
        "view(%9, [-1, 4])", "view(%11, [-1, 4])",
        "mul(%12, 2.0)", "mul(%13, 2.0)",
        "cat([%14, %15], 0)", "cumsum(%16, 0)",  # the whole (mixing) group reads the merged rows
    ]


@pytest.mark.parametrize("boundaries", [(0, 6), (0, 2, 6), (0, 1, 2, 3, 4, 5, 6), (0, 4, 5, 6)])
def test_toy_graph_split_computes_the_unsplit_result(boundaries: tuple[int, ...]) -> None:
    gm = group_ops(annotate(capture_toy()))
    split = split_nanobatches(gm, NanobatchPlan.uniform(["L0.qkv", "L0.attn"], boundaries))
    schedule = assign_units(split)
    args, cache = toy_inputs([3, 2])  # 3 + 2 tokens and one padding token: boundary 2 cuts request 0
    (want,) = gm(*_flat(args))
    cache_after = cache.caches[0].clone()
    cache.caches[0].zero_()
    extra = [t for nb in split_attention_metadata(*args[3:7], 2, boundaries) for t in nb]
    (got,) = ScheduleExecutor(split, schedule)(*_flat(args), *extra)
    assert torch.equal(got, want)  # same ops on the same rows: bitwise equal here
    assert torch.equal(cache.caches[0], cache_after)


def _flat(args: list[torch.Tensor]) -> list:
    """The captured toy graph's inputs: symbolic sizes interleaved as Dynamo lifted them (see TOY_ROLES)."""
    x, w, cache, qo, kvp, kvi, last, slots = args
    return [x.shape[0], x, w, cache, qo.shape[0], qo, kvp.shape[0], kvp, kvi.shape[0], kvi, last.shape[0], last,
            slots]


def test_split_rejects_cutting_a_mixing_group() -> None:
    gm = group_ops(annotate(capture_toy()))
    with pytest.raises(ValueError, match="mixes tokens"):
        split_nanobatches(gm, NanobatchPlan.uniform(["L0.mix"], (0, 3, 6)))


def _llama_step_graph() -> GraphModule:
    model = optimized("llama")
    ids, mask = _left_padded_batch([6, 2, 9])
    model.generate(ids, attention_mask=mask, max_new_tokens=2)
    return group_ops(annotate(model.nanoflow.step_fn.graphs[0]))


@pytest.mark.parametrize("num_nanobatches", [2, 3, 5])
def test_each_op_once_per_nanobatch_and_weights_never_copied(num_nanobatches: int) -> None:
    gm = _llama_step_graph()
    plan = NanobatchPlan.by_kind(group_names(gm), 20, {k: num_nanobatches for k in ("embed", "qkv", "attn", "o",
                                                                                   "ffn")})
    split = split_nanobatches(gm, plan)
    count = lambda g, op: sum(1 for n in g.graph.nodes if n.target == op)  # noqa: E731
    mm, attention = torch.ops.aten.mm.default, torch.ops.nanoflow.paged_attention.default
    # Tiny Llama: 2 layers x 4 GEMMs (q/k/v fused, o, gate/up fused, down), all in cut groups, plus the LM head
    # in the whole `mix` group: 8 * n + 1 GEMMs. Two attention ops, each once per nano-batch.
    assert count(gm, mm) == 9 and count(split, mm) == 8 * num_nanobatches + 1
    assert count(split, attention) == 2 * num_nanobatches
    # Weights: same placeholders, and each weight transpose still appears once (shared by every nano-batch).
    t = torch.ops.aten.t.default
    assert count(split, t) == count(gm, t) == 9
    weights = [p for p in gm.graph.find_nodes(op="placeholder") if not info(p).token_dependent]
    split_weights = {p.name for p in split.graph.find_nodes(op="placeholder")}
    assert {p.name for p in weights} <= split_weights
    for node in split.graph.nodes:
        if node.target in (torch.ops.aten.slice.Tensor, torch.ops.aten.cat.default) and node.op == "call_function":
            assert all(info(a).token_dependent for a in node.all_input_nodes), f"{node.name} touches a weight"
    # Every (group, nano-batch) exactly once in the schedule.
    schedule = assign_units(split)
    keys = [op.key for op in schedule.ops]
    assert len(keys) == len(set(keys))
    expected = {(g, i) for g in group_names(gm) for i in range(plan.split(plan.split_of(g)).num_nanobatches)}
    assert set(keys) == expected


def test_70b_style_4_2_plan_splits_and_schedules() -> None:
    gm = _llama_step_graph()
    plan = NanobatchPlan.by_kind(group_names(gm), 16, {"qkv": 4, "attn": 4, "o": 2, "ffn": 2, "embed": 2})
    split = split_nanobatches(gm, plan)
    schedule = assign_units(split)
    validate(schedule)
    assert {op.unit for op in schedule.ops if op.group.endswith("attn")} == {"memory"}
    assert schedule.split_of("L0.qkv").num_nanobatches == 4 and schedule.split_of("L0.o").num_nanobatches == 2
    # O nano-batch 0 (rows [0, 8)) consumes attention nano-batches 0 and 1 (rows [0, 4) and [4, 8)).
    o0 = next(op for op in schedule.ops if op.key == ("L0.o", 0))
    assert {("L0.attn", 1)} <= set(o0.waits)


def test_validator_rejects_a_real_schedule_with_a_dropped_wait() -> None:
    gm = _llama_step_graph()
    split = split_nanobatches(gm, NanobatchPlan.uniform(splittable_groups(gm), (0, 5, 10)))
    schedule = assign_units(split)
    ops = list(schedule.ops)
    index = next(i for i, op in enumerate(ops) if op.key == ("L0.o", 1))
    ops[index] = dataclasses.replace(ops[index], waits=())  # O#1 no longer waits for attention#1
    with pytest.raises(ScheduleError):
        validate(dataclasses.replace(schedule, ops=tuple(ops)))


def test_passes_on_a_32_layer_8b_shaped_graph_are_fast() -> None:
    """Captured on the meta device (no weights in memory). Prints the pass times; no timed assertion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import nanoflow_fx
    from nanoflow_fx.runtime.nanobatch import NanobatchRunner

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=64, check_capture=False))
    model.nanoflow.runner.run_prompts([[1] * 40, [2] * 20])
    gm = model.nanoflow.step_fn.graphs[0]
    start = time.perf_counter()
    runner = NanobatchRunner(gm, 2)
    step = runner.scheduled(1024)
    total = time.perf_counter() - start
    assert len(step.schedule.ops) == len(group_names(runner.graph)) * 2 - 1  # every group cut in 2 but the tail
    print(f"\n32-layer 8B graph, {len(gm.graph.nodes)} nodes -> {len(step.graph.graph.nodes)}: passes {total:.3f} s")
    for record in step.records:
        print(f"  {record.name:<18} {record.num_nodes:>6} nodes {record.seconds:.3f} s")

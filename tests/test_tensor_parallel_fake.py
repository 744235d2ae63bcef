"""One rank of TP8 for a 70B-shaped model (2 layers), traced in one process on a "fake" process group
(`torch.testing._internal.distributed.fake_pg`): the rank's local shapes and the collectives in its step graph
are what the plan implies. Built on the meta device and sharded as transformers' plan shards a checkpoint
(`distribute_by_plan`): no weights in memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.tp_workers import Workers

TP = 8
# Llama-3-70B's shape, 2 layers
SHAPE = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
             num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=256)


def _task_trace_rank_of_tp8() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    import nanoflow_fx
    from nanoflow_fx.capture.tensor_parallel import distribute_by_plan

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).eval()
    distribute_by_plan(model, init_device_mesh("cpu", (TP,)))
    try:  # FP8 linears would replace the sharded linears (and their collectives): refused, the model untouched
        nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(linear_dtype="fp8_e4m3", check_capture=False))
        fp8_refused = ""
    except nanoflow_fx.UnsupportedModelError as err:
        fp8_refused = str(err)
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=64, check_capture=False,
                                                           replicate_layers=False))
    model.nanoflow.runner.run_prompts([[1] * 40, [2] * 20])
    graph = model.nanoflow.step_fn.captures[-1].graph
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    layer = model.model.layers[0]
    return dict(
        fp8_refused=fp8_refused,
        all_reduces=sum("all_reduce" in str(n.target) for n in calls),
        all_gathers=sum("all_gather" in str(n.target) for n in calls),
        waits=sum("wait_tensor" in str(n.target) for n in calls),
        qkv=tuple(layer.self_attn.q_proj.weight.shape), k=tuple(layer.self_attn.k_proj.weight.shape),
        o=tuple(layer.self_attn.o_proj.weight.shape), down=tuple(layer.mlp.down_proj.weight.shape),
        embed=tuple(model.get_input_embeddings().weight.shape), head=tuple(model.lm_head.weight.shape),
        heads={(c.num_qo_heads, c.num_kv_heads, c.head_dim) for c in model.nanoflow.layers},
        kv_cache=tuple(model.nanoflow.kv_cache.caches[0].shape[2:]),
        mm=sum(n.target == torch.ops.aten.mm.default for n in calls),
        # the all-reduces (and their waits) split along tokens: nano-batches run through them
        reduce_parallel={n.meta["nanoflow"].token_parallel for n in calls if "all_reduce" in str(
            n.args[0].target if "wait_tensor" in str(n.target) else n.target)},
        gather_parallel={n.meta["nanoflow"].token_parallel for n in calls if "all_gather" in str(n.target)},
        # the lowered program: each all-reduce a collective piece of its own (the network unit's)
        pieces=[(p.kind, p.whole) for p in model.nanoflow.step_fn.program.pieces],
    )


def test_fake_process_group_traces_one_rank_of_tp8_70b_shape() -> None:
    workers = Workers(1, backend="fake:8")
    try:
        [got] = workers.run(_task_trace_rank_of_tp8, timeout=600)
    finally:
        workers.close()
    # 2 layers x (o_proj + down_proj) all-reduces, plus the vocabulary-parallel embedding's; one all-gather of
    # the LM head's sampled rows; each collective waited on once.
    assert "linear_dtype='fp8_e4m3' with tensor parallelism (rank 0 of 8) is not supported" in got["fp8_refused"]
    assert got["all_reduces"] == 2 * 2 + 1
    assert got["all_gathers"] == 1
    assert got["waits"] == got["all_reduces"] + got["all_gathers"]
    # Local shards: 64/8 = 8 query heads and 8/8 = 1 KV head of 128 per rank; 28672/8 = 3584 MLP columns;
    # 128256/8 = 16032 vocabulary rows.
    assert got["qkv"] == (8 * 128, 8192) and got["k"] == (1 * 128, 8192)
    assert got["o"] == (8192, 8 * 128) and got["down"] == (8192, 3584)
    assert got["embed"] == got["head"] == (16032, 8192)
    assert got["heads"] == {(8, 1, 128)}
    assert got["kv_cache"][-2:] == (1, 128)  # [page, KV heads, head_dim] per page slot
    # GEMMs: q, k, v, o, gate, up, down per layer (the meta device skips linear fusion), and the LM head
    assert got["mm"] == 2 * 7 + 1
    assert got["reduce_parallel"] == {True}
    assert got["gather_parallel"] == {False}  # (it stacks the ranks' rows along dim 0)
    collective = [whole for kind, whole in got["pieces"] if kind == "collective"]
    assert collective == [False] * got["all_reduces"]  # (split along tokens like the dense pieces around them)
    assert [kind for kind, _ in got["pieces"]][:4] == ["dense", "collective", "dense", "attention"]


def _task_world_of_one_on_nccl(family: str, network_unit: bool = False, search: bool = False) -> dict[str, Any]:
    """A tiny model sharded over a world of 1 on NCCL (every collective a real NCCL call), optimized with CUDA
    graphs; greedy generate() against HF's eager generate() of the same weights. With `network_unit`, prefill
    steps are cut in 2 nano-batches on execution units: the all-reduces run on the network unit's stream. With
    `search`, num_nanobatches="auto": the schedule search runs under TP (its times agreed over the world)."""
    import dataclasses

    from torch.distributed.device_mesh import init_device_mesh

    import nanoflow_fx
    from nanoflow_fx.capture.tensor_parallel import distribute_by_plan
    from tests.helpers import DEFAULT_CONFIG, PAD, left_padded_batch
    from tests.tiny_models import build

    model = distribute_by_plan(build(family, device="cuda"), init_device_mesh("cuda", (1,)))
    config = DEFAULT_CONFIG
    if network_unit:
        config = dataclasses.replace(config, num_nanobatches=2,
                                     experimental=nanoflow_fx.ExperimentalConfig(sm_partition="streams"))
    if search:
        config = dataclasses.replace(config, num_nanobatches="auto")
    nanoflow_fx.optimize(model, config)
    ids, mask = (t.cuda() for t in left_padded_batch([5, 11, 8, 3]))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    got = model.generate(ids, **kwargs)
    want = build(family, device="cuda").generate(ids, **kwargs)
    runner = model.nanoflow.runner
    from tests.steps import program_runners

    schedules = [r.last_schedule for r in program_runners(model) if r.last_schedule is not None]
    schedule = schedules[0] if schedules else None
    return dict(equal=bool(torch.equal(got, want)), graphs=runner.cuda_graphs is not None,
                graph_steps=runner.stats["graph_steps"], tp=model.nanoflow.tensor_parallel is not None,
                plane=model.nanoflow.plane is not None, tunings=len(model.nanoflow.tunings),
                units=schedule.units if schedule is not None else None,
                network_ops=sum(op.unit == "network" for op in schedule.ops) if schedule is not None else 0)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_world_of_one_on_nccl_equals_no_tp(family: str) -> None:
    workers = Workers(1, backend="nccl")
    try:
        [got] = workers.run(_task_world_of_one_on_nccl, family, timeout=600)
    finally:
        workers.close()
    assert got["tp"] and got["plane"]  # the TP path: localized, one control plane
    assert got["graphs"] and got["graph_steps"] > 0  # decode steps replayed NCCL collectives from CUDA graphs
    assert got["equal"]


@pytest.mark.cuda
def test_world_of_one_on_nccl_runs_all_reduces_on_the_network_unit() -> None:
    """Prefill steps cut in 2 on plain streams: the all-reduces on a stream of their own, tokens unchanged."""
    workers = Workers(1, backend="nccl")
    try:
        [got] = workers.run(_task_world_of_one_on_nccl, "llama", True, timeout=600)
    finally:
        workers.close()
    assert got["units"] == ("compute", "memory", "network") and got["network_ops"] > 0
    assert got["equal"]


@pytest.mark.cuda
def test_world_of_one_on_nccl_searches_schedules() -> None:
    """num_nanobatches="auto" under TP: the search runs (every time agreed over the TP group), tokens unchanged."""
    workers = Workers(1, backend="nccl")
    try:
        [got] = workers.run(_task_world_of_one_on_nccl, "llama", False, True, timeout=600)
    finally:
        workers.close()
    assert got["tp"] and got["plane"] and got["tunings"] > 0
    assert got["equal"]

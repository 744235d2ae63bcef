"""Tensor parallelism on the CPU: 2 processes on gloo, each loading a tiny checkpoint with transformers' own TP
(`from_pretrained(..., distributed_config=DistributedConfig(tp_size=2))`, as every torchrun rank does), then
`nanoflow_fx.optimize(model)`. Greedy outputs must equal one process's HF eager `generate()` in fp32, token for
token; the captured step must hold the plan's collectives on each rank's local shards.

One world of 2 processes serves the whole module (`tests/tp_workers.py`): its tasks are the functions `_task_*`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import nanoflow_fx
from tests.helpers import DEFAULT_CONFIG, NO_EOS, PAD, left_padded_batch
from tests.tiny_models import build
from tests.tp_workers import STATE, Workers

pytest.importorskip("accelerate", reason="transformers loads a tp_plan only with accelerate installed")

WORLD = 2
# Families with a TP plan whose heads divide by 2 (tiny configs: 4 query heads, 2 KV heads): dense GQA, sliding
# window, q/k norms, soft-capping with alternating layers.
TP_FAMILIES = ["llama", "mistral", "qwen3", "gemma2"]
CONFIG = dataclasses.asdict(DEFAULT_CONFIG) | {"experimental": None}


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(WORLD)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each family's seed-0 tiny model, saved as a checkpoint the ranks load (hubs are unreachable)."""
    root = tmp_path_factory.mktemp("tp_checkpoints")
    paths = {}
    for family in [*TP_FAMILIES, "mixtral"]:
        build(family).save_pretrained(root / family)
        paths[family] = str(root / family)
    return paths


# ------------------------------------------------------------------------------------------- rank tasks
def _config(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (CONFIG | changes).items() if k != "experimental"}


def _task_load(path: str, key: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Load with transformers' TP plan and optimize; what the rank holds and captured."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_size=WORLD))
    model.set_attn_implementation("eager")
    nanoflow_fx.optimize(model, _config(changes))
    STATE[key] = model
    runtime = model.nanoflow
    graph = runtime.step_fn.captures[-1].graph if runtime.step_fn.captures else None
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"] if graph is not None else []
    return dict(
        tp=dataclasses.asdict(runtime.tensor_parallel),
        passes=[p.name for p in runtime.lowering.passes],
        lowering_key=runtime.lowering.key,
        q_rows=model.model.layers[0].self_attn.q_proj.weight.shape[0],
        embed_rows=model.get_input_embeddings().weight.shape[0],
        kv_heads=[layer.num_kv_heads for layer in runtime.layers],
        all_reduces=sum("all_reduce" in op for op in ops),
        all_gathers=sum("all_gather" in op for op in ops),
        fused=runtime.fused_linear_groups,
        replicated=runtime.step_fn.captures[-1].replicated if runtime.step_fn.captures else None,
    )


def _task_generate(key: str, ids: list[list[int]], mask: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    out = STATE[key].generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=NO_EOS, pad_token_id=PAD)
    return out.tolist()


def _task_generate_batch(key: str, prompts: list[list[int]], max_new_tokens: int,
                         reserve: bool = True) -> dict[str, Any]:
    """Rank 0's prompts run (the others pass none); each rank's results and engine statistics. Without
    `reserve`, admission keeps no pages for the tokens requests will generate (so a small cache preempts)."""
    from tests.tp_workers import rank

    model = STATE[key]
    if not reserve:
        engine = model.nanoflow.engine
        engine.limits, engine._adapt_reserve = dataclasses.replace(engine.limits, reserve_ratio=0.0), False
    results = model.generate_batch(prompts if rank() == 0 else [], max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=NO_EOS)
    stats = model.nanoflow.engine.stats
    return dict(results={rid: list(r.generated_tokens) for rid, r in results.items()},
                preemptions=stats.preemptions, steps=stats.steps, prefix_hit_tokens=stats.prefix_hit_tokens)


def _task_manager(key: str, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """Rank 0 adds the requests, cancels the second and reads the others' results; the other ranks follow."""
    from transformers import GenerationConfig

    from tests.tp_workers import rank

    model = STATE[key]
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=NO_EOS))
    manager.start()
    out: dict[str, Any] = {}
    if rank() == 0:
        ids = [manager.add_request(p, max_new_tokens=max_new_tokens) for p in prompts]
        manager.cancel_request(ids[1])
        for rid in (ids[0], ids[2]):
            result = manager.get_result(request_id=rid, timeout=120)
            out[rid] = list(result.generated_tokens) if result is not None else None
    else:
        out["add_request"] = manager.add_request(prompts[0], max_new_tokens=max_new_tokens)
        out["get_result"] = manager.get_result(timeout=0.1)
    manager.stop(block=True, timeout=120)
    engine = model.nanoflow.engine
    out["held_pages"] = engine.kv_cache.allocator.num_pages - engine.kv_cache.allocator.num_free
    out["running"] = len(engine.running) + len(engine.waiting)
    return out


def _task_diverge(key: str, prompt: list[int]) -> str:
    """Rank 1 gets a request behind the control plane's back: the ranks' plans differ; every rank must raise."""
    from nanoflow_fx.errors import RankDivergenceError
    from nanoflow_fx.runtime.requests import Request
    from tests.helpers import greedy
    from tests.tp_workers import rank

    engine = STATE[key].nanoflow.engine
    stray = Request("stray", list(prompt), greedy(), 4)
    if rank() == 1:
        engine.waiting.append(stray)
    try:
        STATE[key].generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    except RankDivergenceError as err:
        return str(err)
    finally:
        engine.cancel_now(stray)
    return "no error"


def _task_search(key: str, cost_root: str) -> dict[str, Any]:
    """The schedule search (`num_nanobatches="auto"`'s, run here on the CPU) with each rank's replays skewed the
    other way: rank 0 finds every cut 20x slower than measured, rank 1 the unsplit step, so each alone would pick
    differently; rank 1 also cannot replay its first cut (it raises). Returns the rank's own (skewed) replays, the
    search's tunings and its cost table."""
    from unittest import mock

    from nanoflow_fx.cost import measure
    from nanoflow_fx.cost.autotune import search_schedules
    from nanoflow_fx.cost.measure import StepHarness
    from tests.tp_workers import rank

    model, me = STATE[key], rank()
    own: list[tuple[bool, float]] = []  # (unsplit, ms) per replay, as this rank measured it
    original, make_policy = StepHarness.time, measure.policy_for
    refused: list[str] = []

    def skewed(self: StepHarness, policy: Any, reps: int = 6, rounds: int = 3) -> float:
        unsplit = policy(self.shape.tokens, self.shape.decodes) is None
        ms = original(self, policy, reps, rounds) * (20.0 if unsplit == (me == 1) else 1.0)
        own.append((unsplit, ms))
        return ms

    def policy_for(candidate: Any, make_units: Any) -> Any:  # rank 1 cannot make the units of "streams" cuts
        if me == 1 and candidate.units == "streams":
            refused.append(candidate.label())
            raise RuntimeError("rank 1 cannot make these units")
        return make_policy(candidate, make_units)

    cost_dir = Path(cost_root) / f"rank{me}"
    with mock.patch.object(StepHarness, "time", skewed), mock.patch.object(measure, "policy_for", policy_for):
        search_schedules(model, model.nanoflow, str(cost_dir))
    runtime = model.nanoflow
    saved = sorted(p.name for p in cost_dir.rglob("*.json")) if cost_dir.exists() else []
    return dict(own=own, refused=refused, saved=saved,
                tunings=[(t.shape, [(c.label(), ms) for c, ms in t.measured], t.chosen.label())
                         for t in runtime.tunings],
                table=runtime.cost_table.to_json())


def _task_drop(key: str) -> None:
    STATE.pop(key, None)


def _hf_generate(path: str, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=NO_EOS, pad_token_id=PAD).tolist()


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("nanobatches", [1, 2])
@pytest.mark.parametrize("family", TP_FAMILIES)
def test_tp2_greedy_generate_equals_one_process_hf(workers: Workers, checkpoints: dict[str, str], family: str,
                                                    nanobatches: int) -> None:
    key = f"{family}/{nanobatches}"
    info = workers.run(_task_load, checkpoints[family], key, {"num_nanobatches": nanobatches})
    ids, mask = left_padded_batch([5, 11, 8])
    try:
        got = workers.run(_task_generate, key, ids.tolist(), mask.tolist(), 10)
    finally:
        workers.run(_task_drop, key)
    want = _hf_generate(checkpoints[family], ids, mask, 10)
    assert got[0] == got[1] == want
    config = build(family).config
    for rank, rec in enumerate(info):
        assert rec["tp"]["rank"] == rank and rec["tp"]["world_size"] == WORLD
        assert rec["passes"][0] == "tensor_parallel"
        # Local shards: half the query rows and half the vocabulary rows; half the KV heads in each cache layer.
        assert rec["q_rows"] == config.num_attention_heads * (config.head_dim or 0) // WORLD or \
            rec["q_rows"] == config.hidden_size // WORLD
        assert rec["embed_rows"] == config.vocab_size // WORLD
        assert set(rec["kv_heads"]) == {config.num_key_value_heads // WORLD}
    # The key differs per rank (the rank is baked into the embedding's vocabulary range).
    assert info[0]["lowering_key"] != info[1]["lowering_key"]


def test_tp2_step_graph_holds_the_plans_collectives(workers: Workers, tmp_path: Path) -> None:
    """Llama, 5 layers, 3 traced and replicated to 5: an all-reduce after each layer's o_proj and down_proj
    (5 x 2), one for the vocabulary-parallel embedding, and one all-gather of the LM head's sampled rows; the fused
    linears and the replication work on the local shards."""
    path = tmp_path / "llama5"
    build("llama", num_hidden_layers=5).save_pretrained(path)
    info = workers.run(_task_load, str(path), "llama/5", {})
    ids, mask = left_padded_batch([6, 9])
    try:
        got = workers.run(_task_generate, "llama/5", ids.tolist(), mask.tolist(), 6)
    finally:
        workers.run(_task_drop, "llama/5")
    assert got[0] == got[1] == _hf_generate(str(path), ids, mask, 6)
    for rec in info:
        assert rec["replicated"] == (3, 5, 1)  # (layers traced, layers in all, period)
        assert rec["all_reduces"] == 5 * 2 + 1
        assert rec["all_gathers"] == 1
        assert rec["fused"] == 5 * 2  # q/k/v and gate/up of each layer, fused on the local shards


def test_tp2_plan_that_does_not_divide_is_refused(workers: Workers, tmp_path: Path) -> None:
    """1 KV head on 2 ranks: colwise k/v shards would cut the head in half; optimize() must refuse, naming it."""
    path = tmp_path / "one_kv_head"
    build("llama", num_key_value_heads=1).save_pretrained(path)
    with pytest.raises(AssertionError, match="num_key_value_heads=1"):
        workers.run(_task_load, str(path), "odd", {})


def _hf_greedy_alone(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    return [model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=NO_EOS,
                           pad_token_id=PAD)[0, len(p):].tolist() for p in prompts]


def _prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tp2_generate_batch_with_preemption_equals_hf(workers: Workers, checkpoints: dict[str, str],
                                                      family: str) -> None:
    """6 requests of 9-14 + 12 tokens (6-7 pages of 4) in a 16-page cache, admitted without reserving pages for
    their new tokens: some must be preempted, on every rank at the same step; rank 0's prompts only (rank 1 passes
    none) and every rank returns the same results."""
    key = f"{family}/small-cache"
    workers.run(_task_load, checkpoints[family], key, {"num_pages": 16})
    prompts = _prompts([9, 14, 11, 12, 10, 13])
    try:
        got = workers.run(_task_generate_batch, key, prompts, 12, False)
    finally:
        workers.run(_task_drop, key)
    want = _hf_greedy_alone(checkpoints[family], prompts, 12)
    assert list(got[0]["results"].values()) == want
    assert got[1]["results"] == got[0]["results"]
    assert got[0]["preemptions"] == got[1]["preemptions"] > 0
    assert got[0]["steps"] == got[1]["steps"]


def test_tp2_prefix_caching_with_preemption_equals_hf(workers: Workers, checkpoints: dict[str, str]) -> None:
    """Prefix caching under TP: 6 requests sharing a 9-token prefix on a 16-page cache without reservation (shared
    pages, preemption, recomputation hitting cached pages); every rank makes the same plans (`check_plans` on:
    the plans' shared pages included) and the results equal HF's."""
    key = "llama/prefix"
    workers.run(_task_load, checkpoints["llama"], key, {"num_pages": 16, "prefix_caching": True})
    system = _prompts([9], seed=6)[0]
    prompts = [system + tail for tail in _prompts([2, 5, 3, 4, 1, 3], seed=7)]
    try:
        got = workers.run(_task_generate_batch, key, prompts, 12, False)
        again = workers.run(_task_generate_batch, key, prompts[:2], 4, False)
    finally:
        workers.run(_task_drop, key)
    want = _hf_greedy_alone(checkpoints["llama"], prompts, 12)
    assert list(got[0]["results"].values()) == want
    assert got[1]["results"] == got[0]["results"]
    assert got[0]["preemptions"] == got[1]["preemptions"] > 0
    assert got[0]["prefix_hit_tokens"] == got[1]["prefix_hit_tokens"] > 0
    assert [r[:4] for r in want[:2]] == list(again[0]["results"].values())
    assert again[0]["prefix_hit_tokens"] == again[1]["prefix_hit_tokens"] > got[0]["prefix_hit_tokens"]


def test_tp2_manager_requests_on_rank_0_with_cancel(workers: Workers, checkpoints: dict[str, str]) -> None:
    workers.run(_task_load, checkpoints["llama"], "llama/manager", {})
    prompts = _prompts([6, 9, 7], seed=4)
    try:
        got = workers.run(_task_manager, "llama/manager", prompts, 8)
    finally:
        workers.run(_task_drop, "llama/manager")
    want = _hf_greedy_alone(checkpoints["llama"], prompts, 8)
    results = [v for k, v in got[0].items() if k.startswith("req_")]
    assert results == [want[0], want[2]]  # the cancelled second request gave no result
    assert got[1]["add_request"] is None and got[1]["get_result"] is None  # (rank 1: requests enter on rank 0)
    for rank_out in got:
        assert rank_out["held_pages"] == 0 and rank_out["running"] == 0  # the cancel reached every rank


def test_tp2_ranks_fed_different_requests_raise_not_hang(workers: Workers, checkpoints: dict[str, str]) -> None:
    workers.run(_task_load, checkpoints["llama"], "llama/diverge", {})
    try:
        messages = workers.run(_task_diverge, "llama/diverge", _prompts([5])[0], timeout=60)
    finally:
        workers.run(_task_drop, "llama/diverge")
    for message in messages:
        assert "ranks [1] planned step" in message and "stray" in message


def test_tp2_schedule_search_agrees_on_the_slowest_ranks_times(workers: Workers, checkpoints: dict[str, str],
                                                                tmp_path: Path) -> None:
    """Under TP every rank searches together and must pick the same cuts, or their steps' collectives would not
    meet. Each rank's replays are skewed so that alone they would pick differently (rank 0: unsplit, rank 1: a
    cut); agreed, every time is the slowest rank's, every rank keeps the same tunings and cost table, a cut whose
    units one rank cannot make is skipped by both, only the driver writes the table, and the tuned engine still
    gives HF's tokens."""
    from nanoflow_fx.cost.model import UNSPLIT

    key = "llama/search"
    workers.run(_task_load, checkpoints["llama"], key, {"max_num_tokens": 48})
    ids, mask = left_padded_batch([5, 11, 8])
    try:
        got = workers.run(_task_search, key, str(tmp_path), timeout=240)
        tokens = workers.run(_task_generate, key, ids.tolist(), mask.tolist(), 8, timeout=120)
    finally:
        workers.run(_task_drop, key)
    assert tokens[0] == tokens[1] == _hf_generate(checkpoints["llama"], ids, mask, 8)
    assert got[0]["tunings"] == got[1]["tunings"] and got[0]["tunings"]
    assert got[0]["table"] == got[1]["table"]
    assert got[0]["saved"] and not got[1]["saved"]  # (the driver keeps the table)
    own0, own1 = got[0]["own"], got[1]["own"]
    assert [u for u, _ in own0] == [u for u, _ in own1]  # every replay on both ranks, together
    # Each agreed time is the slowest rank's, replay by replay (a shape's measured times are in replay order).
    agreed = [ms for _, measured, _ in got[0]["tunings"] for _, ms in measured]
    assert agreed == [max(a, b) for (_, a), (_, b) in zip(own0, own1, strict=True)]
    unsplit, start = UNSPLIT.label(), 0
    for shape, measured, _ in got[0]["tunings"]:  # alone, rank 0 would keep each step whole, rank 1 would cut it
        labels, mine = [label for label, _ in measured], own0[start:start + len(measured)]
        theirs, start = own1[start:start + len(measured)], start + len(measured)
        assert len(labels) > 1, shape
        assert labels[min(range(len(mine)), key=lambda i: mine[i][1])] == unsplit
        assert labels[min(range(len(theirs)), key=lambda i: theirs[i][1])] != unsplit
    # The cuts on streams, whose units rank 1 could not make, were replayed by neither rank.
    assert got[1]["refused"] and not got[0]["refused"]
    assert not any(label in got[1]["refused"] for _, measured, _ in got[0]["tunings"] for label, _ in measured)


def test_tp2_mixtral_runs_or_is_refused_by_its_plan(workers: Workers, checkpoints: dict[str, str]) -> None:
    """Mixtral: transformers 5.25's plan shards attention only (experts replicated): it must generate as one
    process does; 5.17's also shards experts (`packed_colwise`, `moe_tp_experts`), which optimize() refuses by name."""
    import transformers as tf

    unsupported = {"packed_colwise", "moe_tp_experts"} & set(tf.MixtralConfig.base_model_tp_plan.values())
    if unsupported:
        with pytest.raises(AssertionError, match="UnsupportedModelError.*(moe_tp_experts|packed_colwise)"):
            workers.run(_task_load, checkpoints["mixtral"], "mixtral", {})
        return
    workers.run(_task_load, checkpoints["mixtral"], "mixtral", {})
    ids, mask = left_padded_batch([7, 4])
    try:
        got = workers.run(_task_generate, "mixtral", ids.tolist(), mask.tolist(), 8)
    finally:
        workers.run(_task_drop, "mixtral")
    assert got[0] == got[1] == _hf_generate(checkpoints["mixtral"], ids, mask, 8)

"""Data parallelism over tensor-parallel groups on the CPU: 4 processes on gloo as a (dp 2, tp 2) device mesh, each
TP group one replica (`runtime.replicas`): the model sharded over `mesh["tp"]`, then `nanoflow_fx.optimize(model)`.
`generate_batch` on every rank with the same prompts: each replica runs its share, every rank returns every result,
token-equal to one process's HF eager `generate()` in fp32. Drivers given different prompts raise on every rank.

One world of 4 processes serves the module (`tests/tp_workers.py`); its tasks are the functions `_task_*`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoflow_fx
from nanoflow_fx.runtime.replicas import _input_order, deal
from tests.helpers import DEFAULT_CONFIG, NO_EOS, hf_greedy
from tests.tiny_models import VOCAB, build
from tests.tp_workers import STATE, Workers

DP, TP = 2, 2
CONFIG = {k: v for k, v in dataclasses.asdict(DEFAULT_CONFIG).items() if k != "experimental"}


# ------------------------------------------------------------------------------------------- the deal (pure)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 500), max_size=40), st.integers(1, 6))
def test_deal_gives_every_prompt_to_one_replica_and_keeps_their_tokens_close(lengths: list[int], count: int) -> None:
    shares = deal(lengths, count)
    assert len(shares) == count
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert all(share == sorted(share) for share in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    tokens = [sum(lengths[i] for i in share) for share in shares]
    assert max(tokens) - min(tokens) <= max(lengths, default=0)  # (longest first, round robin)


def test_results_are_ordered_by_input_index_with_children_before_their_parent() -> None:
    ids = ["req_10", "req_2", "req_2__child#1", "req_2__child#0", "req_0"]
    assert sorted(ids, key=_input_order) == ["req_0", "req_2__child#0", "req_2__child#1", "req_2", "req_10"]


# ------------------------------------------------------------------------------------------- rank tasks
def _task_load(path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from nanoflow_fx.capture.tensor_parallel import distribute_by_plan

    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    distribute_by_plan(model, mesh["tp"])
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(**CONFIG))
    STATE["model"] = model
    replicas = model.nanoflow.replicas
    return dict(tp_world=model.nanoflow.tensor_parallel.world_size, replica=replicas.index, groups=replicas.groups,
                driver=replicas.is_driver, q_rows=model.model.layers[0].self_attn.q_proj.weight.shape[0])


def _task_generate_batch(prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """Every rank's results, and what its own engine ran (requests finished, prompt tokens computed)."""
    model = STATE["model"]
    stats = model.nanoflow.engine.stats
    finished, prefill = stats.finished, stats.prefill_tokens
    results = model.generate_batch(prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=NO_EOS)
    return dict(results={rid: list(r.generated_tokens) for rid, r in results.items()},
                finished=stats.finished - finished, prefill=stats.prefill_tokens - prefill)


def _task_diverge(prompts: list[list[int]]) -> str:
    """Replica 1's driver passes other prompts than replica 0's: every rank must raise, none hang."""
    from nanoflow_fx.errors import RankDivergenceError
    from tests.tp_workers import rank

    model = STATE["model"]
    mine = prompts if rank() != TP else prompts[::-1]
    try:
        model.generate_batch(mine, max_new_tokens=3, do_sample=False, eos_token_id=NO_EOS)
    except RankDivergenceError as err:
        return str(err)
    return "no error"


def _task_bad_inputs() -> str:
    """The drivers pass a prompt that is not token ids: every rank raises, none hangs."""
    from nanoflow_fx.errors import InvalidInputError

    try:
        STATE["model"].generate_batch([[5, 6], ["seven"]], max_new_tokens=2)
    except InvalidInputError as err:
        return str(err)
    return "no error"


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workers, list[dict[str, Any]]]]:
    pytest.importorskip("accelerate", reason="transformers' TP plan helpers need accelerate")
    path = Path(tmp_path_factory.mktemp("dp_checkpoint")) / "llama"
    build("llama").save_pretrained(path)
    pool = Workers(DP * TP)
    try:
        loaded = pool.run(_task_load, str(path))
        yield pool, loaded
    finally:
        pool.close()


def test_each_tp_group_is_a_replica(world: tuple[Workers, list[dict[str, Any]]]) -> None:
    _, loaded = world
    assert [r["replica"] for r in loaded] == [0, 0, 1, 1]
    assert [r["driver"] for r in loaded] == [True, False, True, False]
    assert all(r["groups"] == [(0, 1), (2, 3)] and r["tp_world"] == TP for r in loaded)
    assert {r["q_rows"] for r in loaded} == {build("llama").model.layers[0].self_attn.q_proj.weight.shape[0] // TP}


def test_generate_batch_spreads_over_replicas_and_every_rank_returns_every_result(
        world: tuple[Workers, list[dict[str, Any]]]) -> None:
    workers, _ = world
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (9, 4, 13, 6, 11)]
    outs = workers.run(_task_generate_batch, prompts, 6)
    want = {f"req_{i}": list(hf_greedy("llama", tuple(p), 6)) for i, p in enumerate(prompts)}
    for rank, out in enumerate(outs):
        assert list(out["results"]) == list(want), f"rank {rank}"
        assert out["results"] == want, f"rank {rank}"
    # each replica's engine ran only its share (longest first, round robin: 13 and 9 and 4 tokens; 11 and 6)
    shares = deal([len(p) for p in prompts], DP)
    assert shares == [[0, 1, 2], [3, 4]]
    for rank, out in enumerate(outs):
        share = shares[rank // TP]
        assert (out["finished"], out["prefill"]) == (len(share), sum(len(prompts[i]) for i in share)), f"rank {rank}"


def test_replicas_given_different_prompts_raise_on_every_rank(world: tuple[Workers, list[dict[str, Any]]]) -> None:
    workers, _ = world
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    errors = workers.run(_task_diverge, prompts)
    assert all("different prompts" in e and "ranks [2]" in e for e in errors), errors
    # and the world still works afterwards, also with fewer prompts than replicas (replica 1 runs none)
    outs = workers.run(_task_generate_batch, prompts, 3)
    assert all(o["results"] == outs[0]["results"] and len(o["results"]) == 2 for o in outs)
    outs = workers.run(_task_generate_batch, prompts[1:], 3)
    assert [list(o["results"]) for o in outs] == [["req_0"]] * DP * TP
    assert [o["finished"] for o in outs] == [1, 1, 0, 0]


def test_inputs_that_are_not_token_ids_raise_on_every_rank(world: tuple[Workers, list[dict[str, Any]]]) -> None:
    workers, _ = world
    errors = workers.run(_task_bad_inputs)
    assert all("must be lists of token ids" in e for e in errors), errors

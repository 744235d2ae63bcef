"""The lowering every configuration runs: the annotate pass, the program of pieces, cuts of it, the pass list."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.capture.lowering import GraphPass, Lowering, lowering_for
from nanoflow_fx.context import StepContext, step_context
from nanoflow_fx.ops.split_metadata import split_attention_metadata
from nanoflow_fx.passes import info
from nanoflow_fx.runtime.program_runner import NanobatchStep, ProgramRunner, drops_after, program_schedule
from nanoflow_fx.schedule import ScheduleError, validate
from tests.conftest import DEFAULT_CONFIG, optimized
from tests.test_generate_parity import _left_padded_batch
from tests.toy_graph import capture_toy, toy_inputs


def test_toy_graph_annotation() -> None:
    gm = capture_toy().graph
    by_name = {n.name: info(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert by_name["mm"].op_class == "gemm" and by_name["mm"].token_parallel and by_name["mm"].token_dim == 0
    assert by_name["paged_attention"].op_class == "attention" and by_name["paged_attention"].token_parallel
    assert not by_name["cumsum"].token_parallel and "cumsum" in by_name["cumsum"].why_not_parallel
    assert by_name["mm"].flops != 0  # 2 * T * 4 * 4, symbolic in T


def test_toy_graph_lowers_to_dense_attention_dense() -> None:
    capture = capture_toy()
    program = capture.program
    assert [(p.name, p.kind, p.whole) for p in program.pieces] == [
        ("P0", "dense", False),  # x @ w, relu, view: token-parallel
        ("L0.attn", "attention", False),
        ("P1", "dense", True),  # view, * 2, cumsum: mixes tokens, so any cut joins its nano-batches first
    ]
    attention = program.pieces[1]
    assert attention.call is not None and attention.call.scaling == 0.5 and attention.call.backend == "torch"
    # the value crossing from P0 to the attention call carries its token dimension (so a cut can slice it)
    assert all(program.token_dim[name] == 0 for name in attention.inputs if name == attention.call.q)
    assert [r.name for r in capture.passes] == ["annotate", "lower"]
    assert capture.passes[0].changed == 1  # one node mixes tokens: the cumsum


def _check_at_last_pieces(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, made: list[Any],
                          whole: bool = False) -> list[list[bool]]:
    """Give every program runner of `model`'s step a last piece (the LM head) that first records which of the values
    `made` refers to are alive; returns those records. Every runner: a model shared with other tests may hold
    several captured graphs (Dynamo specialises some shapes), and which one a step runs depends on what ran before.
    `whole`: the last piece must run once for the whole step (a nano-batched step's LM head)."""
    from tests.steps import program_runners

    seen: list[list[bool]] = []
    for runner in program_runners(model):
        program = runner.program
        last = program.pieces[-1]
        assert last.call is None and last.fn is not None and (last.whole or not whole)
        assert sum(p.call is not None for p in program.pieces) == model.config.num_hidden_layers

        def checking_last(*values: object, fn: Any = last.fn) -> object:
            seen.append([ref() is not None for ref in made])
            return fn(*values)

        pieces = (*program.pieces[:-1], dataclasses.replace(last, fn=checking_last))
        monkeypatch.setattr(runner, "program", dataclasses.replace(program, pieces=pieces))
        monkeypatch.setattr(runner, "_pieces", {p.name: p for p in pieces})
    return seen


def test_a_whole_step_holds_no_layers_values_past_their_last_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole step drops each value after the last piece that reads it (`ProgramRunner.run_whole`): by its last
    piece, no earlier layer's attention output is alive (a step that kept every value until it returned peaked at
    all layers' activations: 9.5 GiB over the 70B shape's weights at 2,048 tokens), and the outputs are unchanged."""
    import weakref

    from nanoflow_fx.runtime import program_runner

    model = optimized("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    made: list[weakref.ref] = []  # type: ignore[type-arg]
    real_op = program_runner.ATTENTION_OP

    def recording_op(*args: object) -> torch.Tensor:
        out = real_op(*args)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(program_runner, "ATTENTION_OP", recording_op)
    seen = _check_at_last_pieces(monkeypatch, model, made)
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    layers = model.config.num_hidden_layers
    assert layers >= 2 and len(seen) == 1 and len(seen[0]) == layers
    # (the last layer's is the last piece's input)
    assert seen[0][-1] and not any(seen[0][:-1]), f"attention outputs alive at the last piece: {seen[0]}"
    assert torch.equal(got, want)


def test_a_nanobatched_step_holds_no_layers_values_past_their_last_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same of a step cut in two nano-batches run on one stream: when the (whole) LM-head piece runs, no earlier
    layer's attention output is alive in either nano-batch, and the logits are unchanged (a nano-batched step that
    kept every value would peak above the whole step the KV cache was sized by)."""
    import weakref

    from nanoflow_fx.ops.backend import get

    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    prompts = [[5, 6, 7, 8, 9, 10], [9, 10, 11, 12, 13]]
    want = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    made: list[weakref.ref] = []  # type: ignore[type-arg]
    backend = get("torch")
    real_run = backend.run_planned

    def recording_run(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_run(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(backend, "run_planned", recording_run)
    seen = _check_at_last_pieces(monkeypatch, model, made, whole=True)
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    layers = model.config.num_hidden_layers
    assert len(seen) == 1 and len(seen[0]) == 2 * layers  # (each layer's attention ran per nano-batch)
    assert not any(seen[0][:-2]), f"attention outputs alive at the LM head: {seen[0]}"
    assert torch.equal(got, want)

@pytest.mark.parametrize("boundaries", [(0, 6), (0, 2, 6), (0, 1, 2, 3, 4, 5, 6), (0, 4, 5, 6)])
def test_toy_program_cut_computes_the_unsplit_result(boundaries: tuple[int, ...]) -> None:
    runner = ProgramRunner(capture_toy().program)
    args, cache = toy_inputs([3, 2])  # 3 + 2 tokens and one padding token: boundary 2 cuts request 0
    (want,) = runner(*_flat(args))
    cache_after = cache.caches[0].clone()
    cache.caches[0].zero_()
    metadata = split_attention_metadata(*args[3:7], 2, boundaries)
    record = NanobatchStep(boundaries, metadata, tuple(None for _ in metadata))
    with step_context(StepContext(nanobatches=record)):
        (got,) = runner(*_flat(args))
    assert torch.equal(got, want)  # same ops on the same rows: bitwise equal here
    assert torch.equal(cache.caches[0], cache_after)
    if len(boundaries) > 2:  # (one nano-batch runs whole: no schedule)
        assert runner.last_schedule is not None and runner.last_schedule.split_of("P0").boundaries == boundaries


def _flat(args: list[torch.Tensor]) -> list:
    """The captured toy graph's inputs: symbolic sizes interleaved as Dynamo lifted them."""
    x, w, cache, qo, kvp, kvi, last, slots = args
    return [x.shape[0], x, w, cache, qo.shape[0], qo, kvp.shape[0], kvp, kvi.shape[0], kvi, last.shape[0], last,
            slots]


def _llama_program():  # type: ignore[no-untyped-def]
    model = optimized("llama")
    ids, mask = _left_padded_batch([6, 2, 9])
    model.generate(ids, attention_mask=mask, max_new_tokens=2)
    return model.nanoflow.step_fn.program


@pytest.mark.parametrize("num_nanobatches", [2, 3, 5])
def test_each_piece_once_per_nanobatch_and_whole_pieces_once(num_nanobatches: int) -> None:
    program = _llama_program()
    boundaries = tuple(range(0, 21, 20 // num_nanobatches))[:num_nanobatches] + (20,)
    schedule = program_schedule(program, boundaries)
    validate(schedule)
    keys = [op.key for op in schedule.ops]
    assert len(keys) == len(set(keys))
    whole = {p.name for p in program.pieces if p.whole}
    assert whole == {program.pieces[-1].name}  # only the LM head's piece (it selects the logits rows) mixes tokens
    assert set(keys) == {(p.name, i) for p in program.pieces
                         for i in range(1 if p.name in whole else num_nanobatches)}
    assert {op.unit for op in schedule.ops if op.group.endswith(".attn")} == {"memory"}
    assert {op.unit for op in schedule.ops if not op.group.endswith(".attn")} == {"compute"}


def test_uneven_attention_cut_waits_on_the_overlapping_nanobatches() -> None:
    program = _llama_program()
    schedule = program_schedule(program, (0, 8, 16), attention=(0, 4, 8, 12, 16))
    validate(schedule)
    # The piece after layer 0's attention, nano-batch 0 (rows [0, 8)), waits for attention 0 and 1 ([0, 4), [4, 8)).
    after = program.pieces[2].name
    waits = set(next(op for op in schedule.ops if op.key == (after, 0)).waits)
    assert {("L0.attn", 0), ("L0.attn", 1)} <= waits and ("L0.attn", 2) not in waits


def test_validator_rejects_a_real_schedule_with_a_dropped_wait() -> None:
    program = _llama_program()
    schedule = program_schedule(program, (0, 5, 10))
    ops = list(schedule.ops)
    after = program.pieces[2].name
    index = next(i for i, op in enumerate(ops) if op.key == (after, 1))
    ops[index] = dataclasses.replace(ops[index], waits=())  # no longer waits for attention nano-batch 1
    with pytest.raises(ScheduleError):
        validate(dataclasses.replace(schedule, ops=tuple(ops)))


def test_lowering_key_names_the_passes_and_inductor() -> None:
    base = lowering_for(nanoflow_fx.NanoFlowConfig(fuse_linears=True, inductor=False))
    assert [p.name for p in base.passes] == ["fuse_linears"]
    assert base.key == lowering_for(nanoflow_fx.NanoFlowConfig(fuse_linears=True, inductor=False)).key
    assert base.key != lowering_for(nanoflow_fx.NanoFlowConfig(fuse_linears=False, inductor=False)).key
    assert base.key != lowering_for(nanoflow_fx.NanoFlowConfig(fuse_linears=True, inductor=True)).key
    extra = Lowering((*base.passes, GraphPass("fp8_linears", "dynamo", lambda gm, inputs: 0)), base.inductor)
    assert extra.key != base.key
    with_param = Lowering((GraphPass("x", "aten", lambda gm, inputs: 0, (("scale", 1.0),)),))
    assert with_param.key != Lowering((GraphPass("x", "aten", lambda gm, inputs: 0, (("scale", 2.0),)),)).key
    with pytest.raises(ValueError, match="stage"):
        GraphPass("x", "inductor", lambda gm, inputs: 0)
    # the nano-batch count is a run-time cut, not part of the lowering: one saved step serves every count
    assert lowering_for(nanoflow_fx.NanoFlowConfig(num_nanobatches=2)).key == lowering_for(
        nanoflow_fx.NanoFlowConfig(num_nanobatches=1)).key


def test_captured_step_records_each_pass() -> None:
    model = optimized("llama")
    capture = model.nanoflow.step_fn.captures[0]
    names = [r.name for r in capture.passes]
    assert names == ["fuse_linears", "annotate", "lower"]
    # tiny Llama, 2 layers: q/k/v fused and gate/up fused per layer
    assert capture.changed("fuse_linears") == 4
    lower = capture.passes[-1]
    assert lower.nodes_after == len(capture.program.pieces) == 2 * 2 + 1


def test_lowering_a_32_layer_8b_shaped_graph() -> None:
    """Captured on the meta device (no weights in memory). Prints the pass times; no timed assertion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=2, max_seq_len=64, check_capture=False))
    model.nanoflow.runner.run_prompts([[1] * 40, [2] * 20])
    program = model.nanoflow.step_fn.program
    assert program.num_layers == 32 and len(program.pieces) == 2 * 32 + 1
    schedule = program_schedule(program, (0, 512, 1024))
    assert len(schedule.ops) == 2 * len(program.pieces) - 1  # every piece cut in 2 but the LM head's
    # a whole step drops each value after its last reader (and only then): what is alive does not grow with layers.
    # (An attention piece's inputs are every value its call reads: what `drops_after` counts on.)
    for piece in program.pieces:
        call = piece.call
        if call is not None:
            reads = {call.q, call.k, call.v, call.cache, *call.metadata, call.slot_mapping}
            assert reads | ({call.kv_scale} if call.kv_scale is not None else set()) <= set(piece.inputs)
    live: set[str] = set()
    peak = 0
    for j, (piece, dropped) in enumerate(zip(program.pieces, drops_after(program), strict=True)):
        live |= set(piece.outputs)
        peak = max(peak, len(live))
        assert not set(dropped) & {name for later in program.pieces[j + 1:] for name in later.inputs}
        live -= set(dropped)
    assert peak <= 2 * (len(program.pieces[0].outputs) + len(program.pieces[1].outputs))
    capture = model.nanoflow.step_fn.captures[-1]
    print(f"\n32-layer 8B graph, {len(capture.graph.graph.nodes)} nodes -> {len(program.pieces)} pieces")
    for record in capture.passes:
        print(f"  {record}")

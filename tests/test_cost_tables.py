"""The cost tables and the predicted search: pieces measured on a real (CPU) step, predictions from a table
checked against hand-computed schedules, calibration, storage, and the search's replays given a table."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow_fx.cost.model import (
    UNSPLIT,
    Candidate,
    CostTable,
    Prediction,
    StepShape,
    candidates,
    load_table,
    pick,
    replay_order,
    save_table,
    search_shape,
    shape_key,
    subshapes,
)
from nanoflow_fx.ops.backend import DecodeKernel

# A two-layer program as `StepProgram.schedule_key` spells it: dense pieces between attention calls, the last
# dense piece (final norm, logits rows, LM head) whole.
KINDS = (("P0", "dense", False, ()), ("L0.attn", "attention", False, ("P0",)),
         ("P1", "dense", False, ("P0", "L0.attn")), ("L1.attn", "attention", False, ("P1",)),
         ("P2", "dense", True, ("P1", "L1.attn")))
HALF = {"P0": 1.0, "L0.attn": 2.0, "P1": 1.0, "L1.attn": 2.0, "P2": 0.25}
WHOLE = {"P0": 1.8, "L0.attn": 3.6, "P1": 1.8, "L1.attn": 3.6, "P2": 0.5}
PREFILL8 = StepShape(0, 0, 8)


def table() -> CostTable:
    t = CostTable("k", KINDS, 132)
    t.pieces = {"0x0+8": dict(WHOLE), "0x0+4": dict(HALF), "0x0+4@4": dict(HALF)}
    t.host_ms = {"0x0+8": 2.0}
    return t


def test_a_one_stream_cut_costs_the_sum_of_its_nanobatches_and_the_unsplit_step_its_pieces() -> None:
    t = table()
    unsplit = t.predict(PREFILL8, UNSPLIT)
    assert unsplit == Prediction(11.3, 2.0, 11.3, 11.3, (("compute", 11.3),))
    off = t.predict(PREFILL8, Candidate((0.5,)))
    # each half's pieces, the whole piece once (from the whole step's table), on one unit
    assert off is not None and off.gpu_ms == pytest.approx(2 * (1 + 2 + 1 + 2) + 0.5)
    assert dict(off.busy) == {"compute": pytest.approx(off.gpu_ms)} and off.overlap_ms == 0.0
    assert off.host_ms == 4.0  # two nano-batches issued: twice the unsplit step's host time


def test_a_cut_on_two_streams_overlaps_as_its_schedule_says() -> None:
    # compute: P0#0 [0,1] P0#1 [1,2] P1#0 [3,4] P1#1 [5,6] P2 [9,9.5]
    # memory:  L0.attn#0 [1,3] L0.attn#1 [3,5] L1.attn#0 [5,7] L1.attn#1 [7,9]
    got = table().predict(PREFILL8, Candidate((0.5,), False, "streams"))
    assert got is not None and got.gpu_ms == pytest.approx(9.5) and got.ms == pytest.approx(9.5)
    assert dict(got.busy) == {"compute": pytest.approx(4.5), "memory": pytest.approx(8.0)}
    assert got.overlap_ms == pytest.approx(3.0)  # P0#1, P1#0 and P1#1 run under attention calls


def test_an_uneven_cut_is_priced_per_split_and_replayed_as_one() -> None:
    """Dense pieces in 2 nano-batches, attention calls in 4 (NanoFlow's uneven split), on two streams:
    compute: P0#0 [0,1] P0#1 [1,2] P1#0 [3,4] P1#1 [5,6] P2 [9,9.5]
    memory:  L0.attn#0..3 [1,2] [2,3] [3,4] [4,5]  L1.attn#0..3 [5,6] [6,7] [7,8] [8,9]"""
    from nanoflow_fx.cost.model import policy_for
    from nanoflow_fx.runtime.program_runner import Units

    t = table()
    quarter = {"P0": 9.0, "L0.attn": 1.0, "P1": 9.0, "L1.attn": 1.0, "P2": 9.0}  # (only the calls are used)
    t.pieces.update({"0x0+2": quarter, "0x0+2@2": quarter, "0x0+2@4": quarter, "0x0+2@6": quarter})
    cut = Candidate((0.5,), False, "streams", attention=(0.25, 0.5, 0.75))
    assert subshapes(PREFILL8, cut, attention=True) == [StepShape(0, 0, 2, p) for p in (0, 2, 4, 6)]
    got = t.predict(PREFILL8, cut)
    assert got is not None and got.gpu_ms == pytest.approx(9.5) and got.host_ms == pytest.approx(2.0 * 3)
    assert cut.label() == "0.5 attn 0.25/0.5/0.75 streams"
    policy = policy_for(cut, lambda mode, sms: Units({}))
    step = policy(8, 0)
    assert step is not None and step.boundaries == (0, 4, 8) and step.attention == (0, 2, 4, 6, 8)
    same = policy_for(Candidate((0.5,), attention=(0.5,)), lambda mode, sms: None)(8, 0)
    assert same is not None and same.attention is None  # the same cut: one split


def test_each_nanobatch_past_the_first_costs_the_host_what_the_second_did() -> None:
    """With the step's issue time cut in two measured (`host_split_ms`), n nano-batches cost the host the unsplit
    step's time plus (n - 1) times the second nano-batch's extra; without it, n times the unsplit step's."""
    t = table()
    quarter = {"P0": 0.5, "L0.attn": 1.0, "P1": 0.5, "L1.attn": 1.0, "P2": 9.0}
    t.pieces.update({"0x0+2": quarter, "0x0+2@2": quarter, "0x0+2@4": quarter, "0x0+2@6": quarter})
    four, uneven = Candidate((0.25, 0.5, 0.75)), Candidate((0.5,), attention=(0.25, 0.5, 0.75))
    assert [t.predict(PREFILL8, c).host_ms for c in (UNSPLIT, Candidate((0.5,)), uneven, four)] == [  # type: ignore[union-attr]
        2.0, 4.0, 6.0, 8.0]  # assumed: n times 2.0 ms (uneven: (2 + 4) / 2 = 3 nano-batches)
    t.host_split_ms = {"0x0+8": 3.0}  # the second nano-batch costs the host 1.0 ms more
    assert [t.predict(PREFILL8, c).host_ms for c in (UNSPLIT, Candidate((0.5,)), uneven, four)] == [  # type: ignore[union-attr]
        2.0, 3.0, 4.0, 5.0]
    t.host_split_ms = {"0x0+8": 1.5}  # measured below the unsplit step (noise): no nano-batch is free
    assert t.predict(PREFILL8, four).host_ms == 2.0  # type: ignore[union-attr]


def test_partitions_price_attention_from_the_decode_timings_and_gemms_from_the_carveout() -> None:
    t = table()
    t.decode_ref = (8, 100)
    kernel = DecodeKernel("triton", (("block_n", 128),))
    t.decode = {"0|own": 1.0, "32|own": 2.0, f"32|{kernel.label()}": 1.5}
    part = StepShape(4, 100, 4)
    # half the reference's KV tokens: 0.5 ms of the 0.9 on the whole GPU are decode rows; the rest (prefill)
    # takes 132/32 as long on 32 SMs
    assert t._attention_on(part, 0.9, 32, None) == pytest.approx(1.0 + 0.4 * 132 / 32)
    assert t._attention_on(part, 0.9, 32, kernel) == pytest.approx(0.75 + 0.4 * 132 / 32)
    assert t._attention_on(part, 0.9, 48, None) is None  # no decode timing on 48 SMs: not priced
    assert t._attention_on(StepShape(0, 0, 4), 2.0, 33, None) == pytest.approx(8.0)  # prefill only
    # The carve-out's measured factor slows the dense pieces; without it a carve-out candidate is not priced.
    soft, carve = Candidate((0.5,), False, "soft", 33), Candidate((0.5,), False, "carveout", 33)
    assert t.predict(PREFILL8, carve) is None
    t.carveout[33] = 1.5
    fast, slow = t.predict(PREFILL8, soft), t.predict(PREFILL8, carve)
    assert fast is not None and slow is not None and slow.gpu_ms > fast.gpu_ms
    # the table holds no times of the persistent Triton GEMM on partitions: "hard-triton" is not priced
    assert t.predict(PREFILL8, Candidate((0.5,), False, "hard-triton", 33)) is None


def test_missing_measurements_are_named_and_not_guessed() -> None:
    t = table()
    cut = Candidate((0.25,))
    assert [shape_key(s) for s in t.missing(PREFILL8, cut)] == ["0x0+2", "0x0+6@2"]
    assert t.predict(PREFILL8, cut) is None
    # a later piece of the prefill chunk attends over the chunk's earlier tokens: its prefix
    assert subshapes(StepShape(3, 50, 5), Candidate((0.5,))) == [StepShape(3, 50, 1), StepShape(0, 0, 4, 1)]
    assert subshapes(StepShape(3, 50, 5), Candidate((), True)) == [StepShape(3, 50, 0), StepShape(0, 0, 5)]
    assert subshapes(StepShape(0, 0, 9), Candidate((1 / 3, 2 / 3))) == [
        StepShape(0, 0, 3), StepShape(0, 0, 3, 3), StepShape(0, 0, 3, 6)]


def test_calibration_scales_each_mode_on_each_shape_by_what_its_replays_measured() -> None:
    t = table()
    streams, off = Candidate((0.5,), False, "streams"), Candidate((0.5,))
    before = {c: t.predict(PREFILL8, c) for c in (UNSPLIT, streams, off)}
    t.calibrate(PREFILL8, {streams: (2 * before[streams].raw_ms, before[streams]),  # type: ignore[union-attr]
                           UNSPLIT: (before[UNSPLIT].raw_ms, before[UNSPLIT])})  # type: ignore[union-attr]
    assert t.calibration == {"streams|0x0+8": pytest.approx(2.0), "unsplit|0x0+8": pytest.approx(1.0)}
    assert t.calibrated(PREFILL8) == ("streams", "unsplit")
    assert t.predict(PREFILL8, streams).ms == pytest.approx(2 * before[streams].raw_ms)  # type: ignore[union-attr]
    assert t.predict(PREFILL8, off) == before[off]  # a mode not replayed keeps its prediction
    # another shape: its own factor once replayed there; until then the median over the shapes replayed
    other = StepShape(2, 16, 6)
    assert t.calibrated(other) == () and t.factor(other, "streams") == pytest.approx(2.0)
    t.calibration["streams|2x16+6"] = 1.1
    t.calibration["streams|0x0+4"] = 1.5
    assert t.factor(other, "streams") == pytest.approx(1.1) and t.factor(PREFILL8, "streams") == pytest.approx(2.0)
    assert t.factor(StepShape(1, 1, 1), "streams") == pytest.approx(1.5) and t.factor(other, "soft") == 1.0


def test_tables_round_trip_through_disk_and_a_wrong_or_broken_file_is_measured_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = table()
    t.carveout, t.decode, t.decode_ref, t.calibration = {32: 1.2}, {"0|own": 1.0}, (8, 100), {"soft|0x0+8": 1.3}
    t.host_split_ms = {"0x0+8": 3.0}
    save_table(str(tmp_path), t)
    loaded = load_table(str(tmp_path), "k")
    assert loaded == t and loaded.predict(PREFILL8, UNSPLIT) == t.predict(PREFILL8, UNSPLIT)  # type: ignore[union-attr]
    assert load_table(str(tmp_path), "other") is None
    data = json.loads((tmp_path / "k.json").read_text())
    older = {k: v for k, v in data.items() if k != "host_split_ms"}  # kept before the split host time was measured
    (tmp_path / "k.json").write_text(json.dumps(older))
    assert load_table(str(tmp_path), "k") == dataclasses.replace(t, host_split_ms={})
    (tmp_path / "k.json").write_text(json.dumps({**data, "format": 0}))
    assert load_table(str(tmp_path), "k") is None
    (tmp_path / "k.json").write_text("{not json")
    assert load_table(str(tmp_path), "k") is None


def test_replay_order_takes_unsplit_the_top_predictions_and_one_per_unmeasured_mode() -> None:
    a, b, c = Candidate((0.5,), False, "soft", 32), Candidate((0.5,), False, "soft", 48), Candidate((0.5,))
    d = Candidate((0.5,), False, "streams")
    predicted = {UNSPLIT: 10.0, a: 5.0, b: 6.0, c: 12.0, d: 20.0}
    assert replay_order(predicted, top=1) == [UNSPLIT, a, c, d]
    assert replay_order(predicted, top=1, calibrated=("soft", "off", "streams")) == [UNSPLIT, a]
    assert replay_order(predicted, top=2, calibrated=("soft", "off")) == [UNSPLIT, a, b, d]
    # With the unsplit step calibrated too, a calibrated mode's cut predicted more than 3% slower is not replayed
    # (c: 12 ms against 10); an uncalibrated mode's best still is (d).
    calibrated = ("unsplit", "soft", "off")
    assert replay_order(predicted, top=3, calibrated=calibrated) == [UNSPLIT, a, b, d]
    assert replay_order({**predicted, c: 10.3}, top=3, calibrated=calibrated) == [UNSPLIT, a, b, c, d]
    assert replay_order({UNSPLIT: 10.0, c: 10.31}, top=3, calibrated=calibrated) == [UNSPLIT]


SPACE = [c for c in candidates(shares=(33, 66), fractions=(0.25, 0.5, 0.75), modes=("streams", "soft"))
         if not c.at_decodes]


def synthetic(true_ms: dict[Candidate, float]) -> tuple[CostTable, dict[Candidate, Prediction]]:
    """A table whose predictions are the true times (an exact model) and those predictions."""
    t = CostTable("k", KINDS, 132)
    return t, {c: Prediction(ms, 0.0, ms, ms) for c, ms in true_ms.items()}


def test_the_predicted_search_picks_the_known_optimum_and_replays_few() -> None:
    optimum = Candidate((0.25,), False, "soft", 66)
    true_ms = {c: 40.0 + (c.memory_sms / 100) + sum(c.fractions) for c in SPACE}
    true_ms[optimum] = 30.0
    t, predicted = synthetic(true_ms)
    replayed: list[Candidate] = []
    measured = search_shape(SPACE, lambda c: replayed.append(c) or true_ms[c], t, predicted, top=2, shape=PREFILL8)
    assert pick(measured) == optimum
    assert len(replayed) < len(SPACE) and replayed[0] == UNSPLIT and set(replayed) == set(measured)
    assert t.calibration == {f"{m}|0x0+8": pytest.approx(1.0) for m in ("unsplit", "off", "streams", "soft")}
    # Calibrated now: the next search replays the unsplit step and the top predictions only.
    replayed.clear()
    search_shape(SPACE, lambda c: replayed.append(c) or true_ms[c], t, predicted, top=2, shape=PREFILL8)
    assert replayed == [UNSPLIT, optimum, *sorted((c for c in SPACE if c not in (UNSPLIT, optimum)),
                                                  key=lambda c: true_ms[c])[:1]]


@settings(max_examples=100, deadline=None)
@given(true=st.lists(st.floats(1.0, 100.0), min_size=len(SPACE), max_size=len(SPACE)),
       error=st.lists(st.floats(0.5, 2.0), min_size=len(SPACE), max_size=len(SPACE)))
def test_the_predicted_search_is_never_slower_than_unsplit_and_is_deterministic(true: list[float],
                                                                                error: list[float]) -> None:
    true_ms = dict(zip(SPACE, true))
    wrong = {c: ms * e for (c, ms), e in zip(true_ms.items(), error)}  # predictions off by up to 2x
    picks = []
    for _ in range(2):
        t, predicted = synthetic(wrong)
        measured = search_shape(SPACE, lambda c: true_ms[c], t, predicted, top=3, shape=PREFILL8)
        picks.append(pick(measured))
        assert true_ms[picks[-1]] <= true_ms[UNSPLIT]
    assert picks[0] == picks[1]


def test_pieces_measured_on_a_real_step_cover_the_program_and_price_its_cuts() -> None:
    """On the CPU (the step runs synchronously; the host's clock times each piece): every piece of the program
    is timed on a whole step of the shape and of each nano-batch, and the one-stream cut is priced as the sum."""
    from nanoflow_fx.cost.measure import measure_shape, measure_split_host
    from tests.conftest import DEFAULT_CONFIG, optimized

    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    runtime = model.nanoflow
    program, policy = runtime.step_fn.program, runtime.runner.split_policy
    t = CostTable("cpu", program.schedule_key, 1)
    shape, cut = StepShape(4, 16, 20), Candidate((0.5,))
    for part in [shape, *t.missing(shape, cut)]:
        pieces, host = measure_shape(runtime, model.config.vocab_size, part, reps=2)
        assert set(pieces) == {p.name for p in program.pieces} and all(ms > 0 for ms in pieces.values())
        t.pieces[shape_key(part)] = pieces
        t.host_ms.setdefault(shape_key(part), host)
    whole = {p.name for p in program.pieces if p.whole}
    halves = [t.pieces[shape_key(s)] for s in subshapes(shape, cut)]
    want = sum(ms for h in halves for name, ms in h.items() if name not in whole) + sum(
        t.pieces[shape_key(shape)][name] for name in whole)
    got = t.predict(shape, cut)
    assert got is not None and got.gpu_ms == pytest.approx(want)
    assert t.predict(shape, UNSPLIT).gpu_ms == pytest.approx(sum(t.pieces[shape_key(shape)].values()))  # type: ignore[union-attr]
    assert runtime.runner.split_policy is policy  # left as found
    free = runtime.kv_cache.allocator.num_free
    assert measure_split_host(runtime, model.config.vocab_size, shape, reps=2) > 0
    assert runtime.runner.split_policy is policy and runtime.kv_cache.allocator.num_free == free  # left as found


def test_a_shape_whose_pieces_cannot_be_timed_leaves_its_candidates_unpriced(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A failed measurement does not fail optimize(): the candidates needing it are not priced (so not replayed);
    the unsplit step still is."""
    from nanoflow_fx.cost import measure as measuring

    def measure(runtime, vocab_size, shape, reps=3):  # type: ignore[no-untyped-def]
        if shape != PREFILL8:
            raise RuntimeError("no room")
        return dict(WHOLE), 2.0

    monkeypatch.setattr(measuring, "measure_shape", measure)
    monkeypatch.setattr(measuring.StepHarness, "fits", staticmethod(lambda runtime, shape: True))
    t = CostTable("k", KINDS, 132)
    space = [UNSPLIT, Candidate((0.5,)), Candidate((0.5,), False, "streams")]
    with caplog.at_level("WARNING"):
        found = measuring.predict_candidates(None, 100, t, PREFILL8, space)
    assert list(found) == [UNSPLIT] and found[UNSPLIT].gpu_ms == pytest.approx(11.3)
    assert "timing the pieces of StepShape(decodes=0, context=0, prefill=4" in caplog.text


# A tensor-parallel layer as `StepProgram.schedule_key` spells it: the row-wise projection's all-reduce is a
# collective piece of its own between two dense pieces.
TP_KINDS = (("P0", "dense", False, ()), ("C0", "collective", False, ("P0",)), ("P1", "dense", False, ("P0", "C0")),
            ("C1", "collective", False, ("P1",)), ("P2", "dense", True, ("P1", "C1")))


def test_all_reduces_go_on_a_network_unit_under_the_other_nanobatchs_gemms() -> None:
    """Two nano-batches on execution units: each all-reduce on the "network" unit waits for its own nano-batch's
    producer only, so the compute unit runs the other nano-batch's dense piece meanwhile (NanoFlow's ping-pong):
    compute: P0#0 [0,1] P0#1 [1,2] P1#0 [3,4] P1#1 [5,6] P2 [9,9.5]
    network: C0#0 [1,3] C0#1 [3,5] C1#0 [5,7] C1#1 [7,9]"""
    from nanoflow_fx.runtime.program_runner import schedule_of
    from nanoflow_fx.runtime.streams import stream_order

    schedule = schedule_of(TP_KINDS, (0, 4, 8))
    assert schedule.units == ("compute", "memory", "network")
    ops = {op.key: op for op in schedule.ops}
    assert ops[("C0", 1)].unit == "network" and ops[("C0", 1)].waits == (("P0", 1),)
    assert ops[("P1", 0)].waits == (("C0", 0),)  # (P0#0 is on its own unit: program order keeps it)
    order = stream_order(schedule)
    assert order.index(("C0", 0)) < order.index(("P0", 1))  # issued before the next nano-batch's GEMMs
    assert {op.unit for op in schedule_of(TP_KINDS, (0, 4, 8), one_unit=True).ops} == {"compute"}
    assert {g.name: g.op_class for g in schedule.groups}["C1"] == "collective"

    t = CostTable("k", TP_KINDS, 132)
    half = {"P0": 1.0, "C0": 2.0, "P1": 1.0, "C1": 2.0, "P2": 0.25}
    t.pieces = {"0x0+8": {"P0": 1.8, "C0": 3.6, "P1": 1.8, "C1": 3.6, "P2": 0.5}, "0x0+4": dict(half),
                "0x0+4@4": dict(half)}
    t.host_ms = {"0x0+8": 0.5}
    unsplit = t.predict(PREFILL8, UNSPLIT)
    split = t.predict(PREFILL8, Candidate((0.5,), False, "streams"))
    assert unsplit is not None and unsplit.gpu_ms == pytest.approx(11.3)
    assert split is not None and split.gpu_ms == pytest.approx(9.5)
    assert dict(split.busy) == {"compute": pytest.approx(4.5), "memory": 0.0, "network": pytest.approx(8.0)}
    one_stream = t.predict(PREFILL8, Candidate((0.5,)))
    assert one_stream is not None and one_stream.gpu_ms == pytest.approx(12.5)  # (cut, no overlap: slower)

"""Collective timings in the cost table: the pure interpolation by message size (`cost.model.collective_ms`), bus
bandwidth, the table's storage of them, and `cost.measure.measure_all_reduce` on a 2-process gloo world (and on a
world of one on NCCL, CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow_fx.cost.model import (
    CostTable,
    all_reduce_bytes,
    bus_bandwidth_gbps,
    collective_ms,
    load_table,
    save_table,
)
from tests.tp_workers import Workers

KIB = 1024
# latency 0.01 ms, then 100 GB/s: ms = 0.01 + bytes / 1e8 (affine, so linear interpolation is exact in between)
AFFINE = {s: 0.01 + s / 1e8 for s in (16 * KIB, 64 * KIB, 1024 * KIB, 32 * 1024 * KIB)}


def test_interpolation_hits_measured_points_and_is_linear_between() -> None:
    for size, ms in AFFINE.items():
        assert collective_ms(AFFINE, size) == ms
    assert collective_ms(AFFINE, 512 * KIB) == pytest.approx(0.01 + 512 * KIB / 1e8, rel=1e-12)
    # between 64 KiB (0.01065536) and 1 MiB (0.02048576), a quarter of the way
    lo, hi = 64 * KIB, 1024 * KIB
    want = AFFINE[lo] + 0.25 * (AFFINE[hi] - AFFINE[lo])
    assert collective_ms(AFFINE, lo + (hi - lo) // 4) == pytest.approx(want, rel=1e-12)


def test_below_smallest_is_the_latency_floor_and_above_largest_extends_the_last_slope() -> None:
    assert collective_ms(AFFINE, 0) == AFFINE[16 * KIB]
    assert collective_ms(AFFINE, 1) == AFFINE[16 * KIB]
    big = 64 * 1024 * KIB
    assert collective_ms(AFFINE, big) == pytest.approx(0.01 + big / 1e8, rel=1e-12)
    assert collective_ms({4096: 2.0}, 8192) == 4.0  # one size: scaled by bytes above it
    assert collective_ms({4096: 2.0}, 100) == 2.0


def test_bad_tables_and_sizes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="no collective timings"):
        collective_ms({}, 1024)
    with pytest.raises(ValueError, match="negative"):
        collective_ms(AFFINE, -1)
    with pytest.raises(ValueError, match="positive sizes"):
        collective_ms({0: 1.0, 16: 2.0}, 8)
    with pytest.raises(ValueError, match="positive time"):
        bus_bandwidth_gbps(1024, 0.0, 2)


timings = st.dictionaries(st.integers(1, 1 << 26), st.floats(0.0, 100.0), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(timings, st.integers(0, 1 << 27))
def test_interpolation_stays_within_its_neighbours(times: dict[int, float], nbytes: int) -> None:
    """Inside the measured range the time lies between the two measured neighbours' times."""
    got = collective_ms(times, nbytes)
    sizes = sorted(times)
    if nbytes <= sizes[0]:
        assert got == times[sizes[0]]
    elif nbytes <= sizes[-1]:
        hi = next(s for s in sizes if s >= nbytes)
        lo = max(s for s in sizes if s < nbytes)
        assert min(times[lo], times[hi]) - 1e-9 <= got <= max(times[lo], times[hi]) + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=8), st.integers(0, 1 << 27), st.integers(0, 1 << 27))
def test_monotone_timings_give_monotone_predictions(steps: list[float], a: int, b: int) -> None:
    sizes = [16 * KIB << i for i in range(len(steps))]
    times, total = {}, 0.0
    for size, step in zip(sizes, steps):
        total += step
        times[size] = total
    lo, hi = sorted((a, b))
    assert collective_ms(times, lo) <= collective_ms(times, hi) + 1e-9


def test_bus_bandwidth_follows_nccl_tests() -> None:
    # 1 GB in 10 ms is 100 GB/s of algorithm bandwidth; a ring of 8 carries 2 * 7/8 of it per link
    assert bus_bandwidth_gbps(10**9, 10.0, 8) == pytest.approx(175.0)
    assert bus_bandwidth_gbps(10**9, 10.0, 1) == 0.0
    assert all_reduce_bytes(1024, 8192, 2) == 16 * 1024 * KIB


def test_cost_table_prices_a_tp_steps_all_reduces_and_keeps_them_on_disk(tmp_path) -> None:
    table = CostTable("k", (), 132, all_reduce=dict(AFFINE))
    one = collective_ms(AFFINE, all_reduce_bytes(1024, 4096, 2))
    assert table.all_reduce_ms(all_reduce_bytes(1024, 4096, 2), count=65) == pytest.approx(65 * one)
    save_table(str(tmp_path), table)
    again = load_table(str(tmp_path), "k")
    assert again is not None and again.all_reduce == AFFINE
    # a table written before collectives were timed still loads, with none
    data = table.to_json()
    del data["all_reduce"]
    old = CostTable.from_json(json.loads(json.dumps(data)))
    assert old.all_reduce == {}
    with pytest.raises(ValueError, match="no collective timings"):
        old.all_reduce_ms(1024)


# -- measuring on a world ---------------------------------------------------------------------------------------------
def _task_measure(sizes: list[int], device: str) -> dict[int, float]:
    import torch.distributed as dist

    from nanoflow_fx.cost.measure import measure_all_reduce

    if device == "cuda":
        torch.cuda.set_device(0)
    return measure_all_reduce(dist.group.WORLD, torch.device(device), torch.float32, sizes, reps=3)


def _task_bad_size() -> str:
    import torch.distributed as dist

    from nanoflow_fx.cost.measure import measure_all_reduce

    try:
        measure_all_reduce(dist.group.WORLD, torch.device("cpu"), torch.float32, [6])
    except ValueError as err:
        return str(err)
    return "no error"


def test_measure_all_reduce_on_two_gloo_ranks() -> None:
    workers = Workers(2)
    try:
        sizes = [16 * KIB, 256 * KIB]
        got = workers.run(_task_measure, sizes, "cpu", timeout=120)
        for times in got:
            assert sorted(times) == sizes and all(ms > 0 for ms in times.values())
        errors = workers.run(_task_bad_size, timeout=60)
        assert all("not positive multiples" in e for e in errors)
    finally:
        workers.close()


@pytest.mark.cuda
def test_measure_all_reduce_on_a_world_of_one_on_nccl() -> None:
    workers = Workers(1, backend="nccl")
    try:
        from nanoflow_fx.cost.measure import ALL_REDUCE_SIZES

        (times,) = workers.run(_task_measure, list(ALL_REDUCE_SIZES), "cuda", timeout=120)
        assert sorted(times) == list(ALL_REDUCE_SIZES) and all(ms > 0 for ms in times.values())
    finally:
        workers.close()

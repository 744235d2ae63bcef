"""Which CUDA graph a decode step replays in: the smallest bucket that holds it, unless a larger bucket's graph
replays measurably faster (`cuda_graphs.route_buckets`, from the replay times taken at capture)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanoflow_fx.runtime.cuda_graphs import decode_buckets, route_buckets


def test_buckets_cover_every_decode_batch() -> None:
    buckets = decode_buckets(512)
    assert buckets == [2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512]


def test_a_slower_smaller_graph_is_routed_to_the_faster_larger_one() -> None:
    """The H100 figures of benchmarks/bench_buckets.py: the 448-row decode step was slower than the 512-row one."""
    ms = {2: 6.8, 4: 7.1, 8: 7.3, 16: 7.2, 32: 7.5, 64: 8.8, 128: 10.5, 192: 12.5, 256: 14.6, 320: 17.9, 384: 19.8,
          448: 27.0, 512: 22.9}
    assert route_buckets(list(ms), ms) == {448: 512}


@given(st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=13, max_size=13))
def test_a_step_is_routed_only_to_a_larger_bucket_that_is_clearly_faster(times: list[float]) -> None:
    buckets = decode_buckets(512)
    ms = dict(zip(buckets, times))
    route = route_buckets(buckets, ms)
    for bucket in buckets:
        larger = [b for b in buckets if b >= bucket]
        target = route.get(bucket, bucket)
        assert target in larger  # padding only ever adds rows
        if bucket in route:
            assert ms[target] < 0.95 * ms[bucket] and ms[target] == min(ms[b] for b in larger)
        else:
            assert all(ms[b] >= 0.95 * ms[bucket] for b in larger)

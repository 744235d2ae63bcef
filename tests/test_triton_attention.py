"""The Triton paged-attention kernel equals the reference (on the CPU through Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import triton_interpreter  # noqa: F401  (must precede the kernel's import)
from tests.conftest import DEVICES, optimized
from tests.test_generate_parity import _left_padded_batch

pytestmark = pytest.mark.skipif(not triton_interpreter.AVAILABLE, reason="needs the triton package")


@st.composite
def attention_cases(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    page = draw(st.sampled_from([1, 4, 16]))
    heads_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3, 4]))
    requests = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 20)), min_size=1, max_size=4))
    window = draw(st.sampled_from([0, 3, 8]))
    softcap = draw(st.sampled_from([0.0, 2.0]))
    padded = draw(st.integers(0, 3))  # empty requests after the real ones, as CUDA-graph buckets have
    return page, heads_kv, group, requests, window, softcap, padded


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(case=attention_cases())
def test_triton_kernel_equals_reference(device: str, case) -> None:  # type: ignore[no-untyped-def]
    from nanoflow_fx.ops.reference import paged_attention_reference
    from nanoflow_fx.ops.triton_attention import paged_attention_triton

    page, heads_kv, group, requests, window, softcap, padded = case
    gen = torch.Generator().manual_seed(0)
    num_pages = sum(-(-(q + c) // page) for q, c in requests) + 1
    cache = torch.randn(num_pages, 2, page, heads_kv, 16, generator=gen).to(device)
    qo, kvp, kvi, last = [0], [0], [], []
    order = torch.randperm(num_pages, generator=gen).tolist()
    for q_len, cached in requests:
        kv_len = q_len + cached
        n = -(-kv_len // page)
        qo.append(qo[-1] + q_len)
        kvi += [order.pop() for _ in range(n)]
        kvp.append(len(kvi))
        last.append(kv_len - (n - 1) * page)
    num_tokens = qo[-1]
    q = torch.randn(1, heads_kv * group, num_tokens, 16, generator=gen).to(device)[0].transpose(0, 1)
    meta = [torch.tensor(x, dtype=torch.int32, device=device) for x in (qo, kvp, kvi, last)]
    want = paged_attention_reference(q, cache, *meta, 0.3, window, softcap)
    pad = [qo + [qo[-1]] * padded, kvp + [kvp[-1]] * padded, kvi, last + [page] * padded]
    meta = [torch.tensor(x, dtype=torch.int32, device=device) for x in pad]
    got = paged_attention_triton(q, cache, *meta, 0.3, window, softcap)
    assert (got - want).abs().max().item() <= 1e-5  # fp32, "ieee" dots: rounding only
    # a token's KV heads launched side by side: each program still finds its own (token, head), computes the same
    adjacent = paged_attention_triton(q, cache, *meta, 0.3, window, softcap, heads_adjacent=True)
    assert torch.equal(adjacent, got)


def test_generate_with_triton_backend_equals_torch_backend() -> None:
    import dataclasses

    from tests.conftest import DEFAULT_CONFIG

    ids, mask = _left_padded_batch([3, 9, 5])
    want = optimized("gemma2").generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model = optimized("gemma2", dataclasses.replace(DEFAULT_CONFIG, attention_backend="triton"))
    assert model.nanoflow.attention_backend.name == "triton"
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("pv_precision", ["tf32", "half"])
def test_triton_kernel_in_half_precision_is_within_its_rounding(pv_precision: str) -> None:
    """fp16 inputs (Triton's interpreter computes bf16 wrongly, so the bf16 models' case runs in the GPU tests),
    P @ V in tf32 (the default for half models) or with P rounded to fp16 (a memory-unit variant): within a few
    fp16 roundings of the fp32 reference over the same values."""
    from nanoflow_fx.ops.reference import paged_attention_reference
    from nanoflow_fx.ops.triton_attention import paged_attention_triton

    gen = torch.Generator().manual_seed(0)
    page, heads_kv, group, dim = 16, 2, 4, 32
    lengths = [37, 1, 70]
    pages = [-(-n // page) for n in lengths]
    cache = torch.randn(sum(pages) + 1, 2, page, heads_kv, dim, generator=gen).half()
    order = torch.randperm(sum(pages) + 1, generator=gen).tolist()
    kvi = [order.pop() for _ in range(sum(pages))]
    kvp = [0, pages[0], pages[0] + pages[1], sum(pages)]
    last = [n - (p - 1) * page for n, p in zip(lengths, pages)]
    qo = [0, 1, 2, 3]  # one decode row per request
    q = torch.randn(3, heads_kv * group, dim, generator=gen).half()
    meta = [torch.tensor(x, dtype=torch.int32) for x in (qo, kvp, kvi, last)]
    want = paged_attention_reference(q.float(), cache.float(), *meta, dim**-0.5, 0, 0.0)
    got = paged_attention_triton(q, cache, *meta, dim**-0.5, 0, 0.0, pv_precision=pv_precision, block_n=32)
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max().item() <= 4 * 2**-11 * want.abs().max().item()
    # the K/V loads' cache policy changes where they sit in L2, not what they read
    evicting = paged_attention_triton(q, cache, *meta, dim**-0.5, 0, 0.0, pv_precision=pv_precision, block_n=32,
                                      kv_eviction="evict_first")
    assert torch.equal(evicting, got)


def test_triton_kernel_refuses_half_p_at_v_on_a_full_precision_cache() -> None:
    """"half" rounds P to the cache's half type: on an fp32 cache it would be fp32 dots at the default (tf32)
    precision, silently less exact than the reference; it is refused instead."""
    from nanoflow_fx.ops.triton_attention import paged_attention_triton

    meta = [torch.tensor(x, dtype=torch.int32) for x in ([0, 1], [0, 1], [0], [3])]
    with pytest.raises(ValueError, match="half type"):
        paged_attention_triton(torch.zeros(1, 2, 16), torch.zeros(1, 2, 4, 1, 16), *meta, 0.25, 0, 0.0,
                               pv_precision="half")

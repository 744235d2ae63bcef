"""The fused KV-cache write equals the reference write exactly (a copy with a cast), on the CPU through Triton's
interpreter and on the GPU: any page size, head count, head dim (padded to a power of two inside), strided k/v
(views of a fused QKV output), a cast to the cache's dtype; slots outside the written ones stay untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import triton_interpreter  # noqa: F401  (must precede the kernel's import)
from tests.conftest import DEVICES

pytestmark = pytest.mark.skipif(not triton_interpreter.AVAILABLE, reason="needs the triton package")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(page=st.sampled_from([1, 4, 16]), heads=st.integers(1, 3), dim=st.sampled_from([8, 12, 16]),
       tokens=st.integers(1, 20), half=st.booleans(), seed=st.integers(0, 99))
def test_fused_kv_write_equals_reference(device: str, page: int, heads: int, dim: int, tokens: int, half: bool,
                                         seed: int) -> None:
    from nanoflow_fx.ops.kv_write import write_kv_triton
    from nanoflow_fx.ops.reference import write_kv_

    gen = torch.Generator().manual_seed(seed)
    num_pages = -(-tokens // page) + 2
    dtype = torch.float16 if half and device == "cuda" else torch.float32
    cache = torch.randn(num_pages, 2, page, heads, dim, generator=gen).to(device=device, dtype=dtype)
    qkv = torch.randn(tokens, 3 * heads * dim, generator=gen).to(device)  # fp32, as activations may be
    k = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)  # strided views, as the capture gives
    v = qkv[:, 2 * heads * dim :].view(tokens, heads, dim)
    slots = torch.randperm(num_pages * page, generator=gen)[:tokens].to(device)
    want, got = cache.clone(), cache.clone()
    write_kv_(want, k, v, slots)
    write_kv_triton(got, k, v, slots)
    assert torch.equal(got, want)

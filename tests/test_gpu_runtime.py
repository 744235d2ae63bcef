"""GPU runtime: the Triton backend and CUDA-graph replay equal the reference path (run with `pytest -m cuda`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanoflow_fx.runtime import Chunk
from nanoflow_fx.runtime.batch import StepShape
from tests.conftest import ALL_FAMILIES, DEFAULT_CONFIG, optimized, reference
from tests.steps import admit, release
from tests.test_generate_parity import _left_padded_batch

GRAPHS = dataclasses.replace(DEFAULT_CONFIG, attention_backend="triton", cuda_graphs=True)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cuda_graph_generation_equals_hf(family: str) -> None:
    model = optimized(family, GRAPHS, device="cuda")
    engine = model.nanoflow.runner
    if family == "mixtral":  # fp32 MoE: HF's grouped-mm fallback syncs (.tolist()), so capture must give up
        assert engine.cuda_graphs is None and "capture failed" in engine.cuda_graphs_off_reason
    else:
        assert engine.cuda_graphs is not None
    ids, mask = (t.cuda() for t in _left_padded_batch([3, 12, 7, 9]))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    want = reference(family, device="cuda").generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    single = model.generate(ids[:1], max_new_tokens=5, do_sample=False)  # 1-token decode steps: bucket 2
    assert torch.equal(single, reference(family, device="cuda").generate(ids[:1], max_new_tokens=5,
                                                                           do_sample=False))


def test_cuda_graphs_stay_off_with_the_reason_where_they_cannot_run() -> None:
    engine = optimized("llama").nanoflow.runner  # CPU, reference attention: cuda_graphs=True cannot apply
    assert engine.cuda_graphs is None and engine.cuda_graphs_off_reason == "the model is not on CUDA"
    assert not engine.enable_cuda_graphs()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_padded_bucket_step_equals_unpadded_step(device: str) -> None:
    """A step padded to a bucket shape (one-token padding requests, empty requests, unused pages) computes the
    same."""
    model = optimized("llama", device=device)
    engine = model.nanoflow.runner
    requests = admit(engine, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_new_tokens=1)
    try:
        chunks = [Chunk(requests[0], 3), Chunk(requests[1], 2), Chunk(requests[2], 4)]
        cache = engine.kv_cache
        from nanoflow_fx.runtime.batch import build_step

        plain = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, engine.device, True)
        want = model.nanoflow.step_fn(plain.input_ids, plain.position_ids, plain.logits_indices, plain.metadata)
        # 3 requests + 7 one-token padding requests, then 2 empty requests and unused page ids
        shape = StepShape(tokens=16, requests=12, pages=cache.allocator.num_pages + 9, logits=12)
        padded = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, engine.device, True,
                            shape=shape)
        assert padded.input_ids.shape[0] == 16 and padded.metadata.qo_indptr.shape[0] == 13
        got = model.nanoflow.step_fn(padded.input_ids, padded.position_ids, padded.logits_indices, padded.metadata)
        assert got.shape[0] == 12
        torch.testing.assert_close(got[: padded.num_logits], want[: plain.num_logits], rtol=0, atol=1e-5)
        # A CUDA-graph bucket's own shape (as CudaGraphRunner.shape_for makes it): T requests, pages + T page ids
        shape = StepShape(tokens=16, requests=16, pages=cache.allocator.num_pages + 16, logits=16)
        padded = build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, engine.device, True,
                            shape=shape)
        assert padded.metadata.qo_indptr.tolist()[3:] == list(range(9, 17)) + [16] * 6  # 7 padding, 6 empty
        got = model.nanoflow.step_fn(padded.input_ids, padded.position_ids, padded.logits_indices, padded.metadata)
        torch.testing.assert_close(got[: padded.num_logits], want[: plain.num_logits], rtol=0, atol=1e-5)
    finally:
        release(engine, requests)

"""An optimized model used carelessly: bad inputs get clear errors like HF's, and changes made to the model
after `optimize()` are followed (or named, with what to do); nothing is ever silently wrong."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.capture import hf_attention
from tests.helpers import DEFAULT_CONFIG, BatchMixingLlama, fresh, left_padded_batch, optimized, reference
from tests.tiny_models import VOCAB, build


def test_token_ids_outside_the_vocabulary_are_rejected() -> None:
    """-1 is also the runtime's marker for a token still on the device: it must never pass as a prompt token."""
    model = optimized("llama")
    for bad in (-1, VOCAB):
        ids = torch.tensor([[5, 6, bad, 7]])
        with pytest.raises(nanoflow_fx.InvalidInputError,
                           match=rf"sequence 0: token 2 of the prompt, {bad}, is not a token id"):
            model.generate(ids, max_new_tokens=2)
    padded = torch.tensor([[-1, 5, 6]])  # a value under the mask is not a token: allowed
    mask = torch.tensor([[0, 1, 1]])
    want = reference("llama").generate(torch.tensor([[0, 5, 6]]), attention_mask=mask, max_new_tokens=3,
                                       do_sample=False)
    got = model.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(got[:, 3:], want[:, 3:])


def test_padding_inferred_from_pad_token_id_is_checked_like_an_explicit_mask() -> None:
    model = optimized("llama")
    right = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])  # pad_token_id 0 at the end of row 1
    with pytest.raises(nanoflow_fx.InvalidInputError, match=r"rows \[1\] have padding after .*pad_token_id=0"):
        model.generate(right, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(nanoflow_fx.InvalidInputError, match=r"rows \[1\] have padding after .*attention_mask"):
        model.generate(right, attention_mask=(right != 0).long(), max_new_tokens=2)
    empty = torch.tensor([[5, 6, 7], [0, 0, 0]])  # a row of pad tokens only: no hang, a clear error
    with pytest.raises(nanoflow_fx.InvalidInputError, match=r"rows \[1\] have no tokens"):
        model.generate(empty, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(nanoflow_fx.InvalidInputError, match=r"rows \[1\] have no tokens"):
        model.generate(empty, attention_mask=(empty != 0).long(), max_new_tokens=2)
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])  # inferred left padding runs as HF runs it
    want = reference("llama").generate(left, max_new_tokens=4, pad_token_id=0, do_sample=False)
    assert torch.equal(model.generate(left, max_new_tokens=4, pad_token_id=0, do_sample=False), want)


def test_small_gaps_behave_like_hf() -> None:
    model, ref = optimized("llama"), reference("llama")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    want = ref.generate(ids, max_new_tokens=2.5, do_sample=False)  # type: ignore[arg-type]
    got = model.generate(ids, max_new_tokens=2.5, do_sample=False)  # type: ignore[arg-type]
    assert got.shape == want.shape == (2, 8) and torch.equal(got, want)
    got32 = model.generate(ids.to(torch.int32), max_new_tokens=3, do_sample=False)
    want32 = ref.generate(ids.to(torch.int32), max_new_tokens=3, do_sample=False)
    assert got32.dtype == want32.dtype and torch.equal(got32, want32)
    with pytest.raises(nanoflow_fx.InvalidInputError, match="no rows"):
        model.generate(torch.zeros(0, 5, dtype=torch.long), max_new_tokens=2)


def test_optimize_takes_a_dict_and_rejects_other_types() -> None:
    model = nanoflow_fx.optimize(build("llama"), {"page_size": 4, "max_batch_size": 2, "max_seq_len": 32})
    assert model.nanoflow.config.page_size == 4
    with pytest.raises(TypeError, match="NanoFlowConfig or a dict"):
        nanoflow_fx.optimize(build("llama"), "page_size=4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no field"):
        nanoflow_fx.optimize(build("llama"), {"pagesize": 4})


def test_a_failed_optimize_leaves_the_model_as_it_was() -> None:
    model = BatchMixingLlama(build("llama").config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, VOCAB, (1, 6))
    before = model(ids).logits
    with pytest.raises(nanoflow_fx.CaptureMismatchError):
        nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert model.config._attn_implementation == "eager"
    assert "nanoflow" not in model.__dict__ and "generate" not in model.__dict__
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages), "every parameter has its own storage again"
    assert torch.equal(model(ids).logits, before)


def test_switching_attention_after_optimize_keeps_generate_right() -> None:
    model, ref = fresh(), reference("llama")
    ids, mask = left_padded_batch([4, 9])
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)
        # the user's choice stays for forward(); the config keeps naming nanoflow's step, whose attention function
        # runs the plain choice for plain calls (a per-call switch of the config raced with other threads)
        assert model.config._attn_implementation == "nanoflow"
        assert hf_attention.PLAIN.get(model.config) == implementation
        ref.set_attn_implementation(implementation)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_plain_forwards_and_generate_in_threads_at_once_stay_right() -> None:
    """set_attn_implementation("sdpa") after optimize(), then generate() in one thread and the plain forward in
    another: generate() flipped the shared config per call, so some plain forwards ran the wrong attention
    (13-23 of ~4,000 gave wrong logits) and a generate() could trace the wrong one. Nothing is flipped per call."""
    import threading

    model, ref = fresh(), reference("llama")
    model.set_attn_implementation("sdpa")
    ref.set_attn_implementation("sdpa")
    ids, mask = left_padded_batch([4, 9])
    want_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want_logits = ref(ids, attention_mask=mask).logits
    seen: list[str] = []
    wrong: list[str] = []
    stop = threading.Event()

    def forwards() -> None:
        with torch.no_grad():
            while not stop.is_set():
                seen.append(model.config._attn_implementation)
                if not torch.allclose(model(ids, attention_mask=mask).logits, want_logits, atol=1e-5):
                    wrong.append("forward")

    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        for _ in range(30):
            if not torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                               want_tokens):
                wrong.append("generate")
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive() and len(seen) > 30
    assert not wrong and set(seen) == {"nanoflow"}


def test_replaced_parameters_are_laid_out_again() -> None:
    """load_state_dict(assign=True) and .double().float() replace the fused linears' storage."""
    model, ids = fresh(), torch.randint(3, VOCAB, (2, 6))
    other = build("llama", seed=1)
    model.load_state_dict(other.state_dict(), assign=True)
    want = other.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    model.double().float()
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def _manager_tokens(manager: object, prompts: list[list[int]], new: int) -> list[object]:
    """Each prompt through a running manager, one after another: its result (status, tokens, error)."""
    results = []
    for prompt in prompts:
        rid = manager.add_request(prompt, max_new_tokens=new)  # type: ignore[attr-defined]
        result = manager.get_result(request_id=rid, timeout=60)  # type: ignore[attr-defined]
        assert result is not None, "no result within 60 s"
        results.append(result)
    return results


def test_a_running_manager_follows_replaced_parameters() -> None:
    """A manager started before the weights change (load_state_dict(assign=True), p.data = new) answers with the
    new weights, as generate() does; it failed every request ('setStorage ... out of bounds') and its thread died."""
    model, prompts = fresh(), [[5, 6, 7, 8], [9, 10, 11]]
    other = build("llama", seed=1)
    want = [other.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()
            for p in prompts]
    manager = model.init_continuous_batching()
    manager.start()
    try:
        _manager_tokens(manager, prompts[:1], 2)  # running on the old weights
        model.load_state_dict(other.state_dict(), assign=True)
        got = _manager_tokens(manager, prompts, 4)
        assert [r.generated_tokens for r in got] == want and all(r.error is None for r in got)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()  # new storage for every parameter (the fused linears' too)
        assert [r.generated_tokens for r in _manager_tokens(manager, prompts, 4)] == want
        assert manager.is_running()
    finally:
        manager.stop(block=True, timeout=60)


def test_a_manager_says_to_optimize_again_after_the_model_moved() -> None:
    model = fresh()
    manager = model.init_continuous_batching()
    manager.start()
    try:
        _manager_tokens(manager, [[5, 6, 7]], 2)
        model.to(torch.bfloat16)
        (result,) = _manager_tokens(manager, [[5, 6, 7]], 2)
        assert result.error is not None and "call nanoflow_fx.optimize(model) again" in result.error
        assert "moved from torch.float32" in result.error
    finally:
        manager.stop(block=True, timeout=60)


def test_max_seq_len_beyond_the_models_positions_is_refused() -> None:
    """GPT-2's learned position table has 64 rows here: a request past it raised a raw IndexError mid-batch."""
    with pytest.raises(nanoflow_fx.NanoFlowError, match=r"max_seq_len=128 exceeds GPT2LMHeadModel's "
                                                       r"max_position_embeddings=64.*set max_seq_len <= 64"):
        nanoflow_fx.optimize(build("gpt2", n_positions=64), dataclasses.replace(DEFAULT_CONFIG, max_seq_len=128))
    model = nanoflow_fx.optimize(build("gpt2", n_positions=64), dataclasses.replace(DEFAULT_CONFIG, max_seq_len=None))
    assert model.nanoflow.config.max_seq_len == 64


def test_a_deep_copy_says_to_optimize_it_and_the_original_still_works() -> None:
    model, ids = fresh(), torch.randint(3, VOCAB, (1, 6))
    want = reference("llama").generate(ids, max_new_tokens=5, do_sample=False)
    clone = copy.deepcopy(model)
    with pytest.raises(nanoflow_fx.NanoFlowError, match="call nanoflow_fx.optimize"):
        clone.generate(ids, max_new_tokens=5)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
    nanoflow_fx.optimize(clone, DEFAULT_CONFIG)
    assert torch.equal(clone.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_a_model_moved_after_optimize_says_to_optimize_it_again() -> None:
    model, ids = fresh(), torch.randint(3, VOCAB, (1, 6))
    model.to(torch.bfloat16)
    with pytest.raises(nanoflow_fx.NanoFlowError, match=r"moved from torch.float32 .* to torch.bfloat16.*again"):
        model.generate(ids, max_new_tokens=3)
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert model.nanoflow.kv_cache.dtype == torch.bfloat16
    assert model.generate(ids, max_new_tokens=3).shape == (1, 9)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_float64_models_run(family: str) -> None:
    """(One unpadded row: HF's own fp64 eager attention turns fully masked padding rows into NaNs.)"""
    model = nanoflow_fx.optimize(build(family, dtype=torch.float64), DEFAULT_CONFIG)
    assert model.nanoflow.attention_backend.name == "torch" and model.nanoflow.kv_cache.dtype == torch.float64
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    want = build(family, dtype=torch.float64).generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)


def test_nanobatched_steps_keep_no_state_per_step_size() -> None:
    """Nano-batched steps of any size run on one captured program (its pieces take the token count as a symbol),
    so nothing grows with the number of distinct step sizes: the captured graphs stay few and the cached
    schedules are bounded."""
    from nanoflow_fx.runtime.program_runner import _planned

    # Its own model: the shared one may have been traced again by other tests (explain() does), in any order
    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 40):
        ids = torch.randint(3, VOCAB, (1 + n % 3, 1 + n), generator=gen)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert len(model.nanoflow.step_fn.graphs) <= 2  # Dynamo's specialisations, not one per size
    info = _planned.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize


def test_kv_cache_exhausted_names_what_is_missing() -> None:
    from nanoflow_fx.runtime import PageAllocator

    allocator = PageAllocator(10)
    allocator.allocate(7)
    with pytest.raises(nanoflow_fx.KVCacheExhaustedError,
                       match=r"needs 5 pages but only 3 of 10 are free \(2 more than it has\)"):
        allocator.allocate(5)
    assert allocator.num_free == 3  # all-or-nothing


@pytest.mark.parametrize("layers", [2, 5])  # 5: the replicated path (its own trace of the first layers)
def test_a_dropped_or_reoptimized_model_frees_its_runtime_and_weights(layers: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo keeps compiled steps in caches the garbage collector cannot see into; nothing there may hold the
    model, its runtime or its KV cache (they leaked for the process's life: a second optimize() of an 8B model
    on an H100 ran out of memory). A second optimize() frees the old KV cache before it allocates its own, which
    it sizes from the free memory. And an optimized model is in no reference cycle: dropping it frees its KV
    cache and weights at once, not at the collector's next run (on an H200, optimizing one model after another
    found the previous KV cache still held). Automatic collection is off here so that it cannot hide either."""
    import gc
    import weakref

    from nanoflow_fx.runtime.kv_cache import PagedKVCache

    model = nanoflow_fx.optimize(build("llama", num_hidden_layers=layers), DEFAULT_CONFIG)
    assert (model.nanoflow.step_fn.replicated is not None) == (layers == 5)
    model.generate(torch.randint(3, 100, (2, 5)), max_new_tokens=3, do_sample=False)
    first = weakref.ref(model.nanoflow.kv_cache)
    old_alive: list[bool] = []
    init = PagedKVCache.__init__

    def recording_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        old_alive.append(first() is not None)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PagedKVCache, "__init__", recording_init)
    gc.disable()
    try:
        nanoflow_fx.optimize(model, DEFAULT_CONFIG)  # replaces the runtime
        assert old_alive and not any(old_alive)
        assert first() is None
        second, weights = weakref.ref(model.nanoflow.kv_cache), weakref.ref(model.lm_head.weight)
        del model
        assert second() is None and weights() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("changes", [{}, {"num_nanobatches": 2}], ids=["whole", "nanobatched"])
def test_a_model_used_every_way_is_freed_at_once_when_dropped(changes: dict[str, object]) -> None:
    """After generate(), generate_batch() and a manager's run (and with nano-batches, whose pieces and channel are
    the runtime's), dropping the model (and the manager, which holds it as transformers' does) frees its KV cache
    and weights by reference counting alone."""
    import gc
    import weakref

    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(DEFAULT_CONFIG, **changes))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=3, do_sample=False)
    model.generate_batch([[5, 6, 7], [8, 9]], max_new_tokens=3)
    manager = model.init_continuous_batching()
    manager.start()
    manager.add_request([5, 6, 7], max_new_tokens=3)
    assert manager.get_result(timeout=60) is not None
    manager.stop(block=True, timeout=60)
    kv, weights = weakref.ref(model.nanoflow.kv_cache), weakref.ref(model.lm_head.weight)
    gc.collect()
    gc.disable()
    try:
        del model, manager
        assert kv() is None and weights() is None
    finally:
        gc.enable()


@pytest.mark.cuda
def test_models_optimized_one_after_another_free_the_gpu_at_once() -> None:
    """The issue's case on a GPU: small models optimized one after another in one process, each dropped before the
    next, each KV cache sized from the free memory (num_pages=None: ~90% of the GPU). Each drop must give the
    memory back at once (automatic collection off), and every optimize() must find it free."""
    import gc

    config = nanoflow_fx.NanoFlowConfig(max_batch_size=8, max_seq_len=96, page_size=16)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    gc.collect()
    total = torch.cuda.mem_get_info()[1]
    for i, family in enumerate(["llama", "gemma2", "llama"]):
        before = torch.cuda.memory_allocated()
        model = nanoflow_fx.optimize(build(family, dtype=torch.bfloat16, device="cuda"), config)
        assert model.nanoflow.kv_cache.num_bytes > 0.5 * total  # sized from the memory the last one freed
        model.generate(ids, max_new_tokens=3, do_sample=False)
        model.generate_batch([[5, 6, 7]], max_new_tokens=3)
        gc.disable()
        try:
            del model
            left = torch.cuda.memory_allocated() - before
        finally:
            gc.enable()
        assert left < 0.01 * total, f"model {i} ({family}) left {left / 2**30:.2f} GiB allocated after its drop"

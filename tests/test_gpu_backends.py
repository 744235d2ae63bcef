"""Attention backends on the GPU, in bf16, against the torch reference backend, step by step and per bucket.

FlashInfer takes head_dim 64/128/256 and fp16/bf16 only, so these models are small bf16 models with head_dim 64
(the fp32 tiny models of the parity tests have head_dim 8-16). Each case runs the same token stream through an
engine with the reference backend (graphs off) and one with the backend under test (graphs on, every decode
bucket hit): prefill chunks, then decode steps at batch sizes 1, 3, 8 and 13 (buckets 2, 4, 8, 16).

Tolerance: both runs use bf16 weights and activations; they differ in how attention rounds (the reference
attends in fp32 per request, the kernels in bf16 tiles with fp32 accumulation). bf16 keeps 8 significant bits
(relative rounding 2^-9), and a difference that enters one layer's attention output is carried through the
remaining layers, so logits may differ by a few times 2^-8 of their scale: we allow 2^-5 (3.1%) of the largest
logit, and require greedy tokens to agree wherever the reference's top two logits are further apart than that.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import nanoflow_fx
from nanoflow_fx.runtime import Engine
from tests.steps import admit, release, run, stream_chunks

pytestmark = pytest.mark.cuda

TOLERANCE = 2**-5
_COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
CONFIGS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, sliding_window=24)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **_COMMON, sliding_window=24, attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=64)),
}
BATCH_SIZES = (1, 3, 8, 13)


def _flashinfer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


def _model(family: str, backend: str, graphs: bool, inductor: bool = False,
           kv_cache_dtype: str = "auto", fp8_attention: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CONFIGS[family]().to(device="cuda", dtype=torch.bfloat16).eval()
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=16, max_seq_len=160, page_size=16, max_num_tokens=256,
                                        num_pages=256, attention_backend=backend, cuda_graphs=graphs,
                                        inductor=inductor, interim_attention=False,  # these test the backend
                                        kv_cache_dtype=kv_cache_dtype, fp8_attention=fp8_attention)
    return nanoflow_fx.optimize(model, config)


def _run_stream(model: torch.nn.Module, batch: int, follow: list[list[int]] | None) -> tuple[list, list[list[int]]]:
    """Run `batch` prompts through the engine's own schedule (prefill chunks, mixed steps, then decode steps)
    until each has 6 new tokens; returns every step's logits and the tokens fed (this model's greedy choice
    unless `follow` gives them, so two models see the same stream)."""
    runner = model.nanoflow.runner
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(20, 90, (batch,), generator=gen)]
    requests = admit(runner, prompts, max_new_tokens=16)
    logits_per_step, fed = [], []
    try:
        while any(len(r.output) < 6 for r in requests):
            chunks = stream_chunks(requests, model.nanoflow.config.max_num_tokens)
            logits = run(runner, chunks, all_logits=False).float().cpu()
            tokens = follow[len(fed)] if follow else logits.argmax(-1).tolist()
            logits_per_step.append(logits)
            fed.append(tokens)
            for req, token in zip([c.request for c in chunks if c.completes], tokens):
                req.output.append(token)
    finally:
        release(runner, requests)
    return logits_per_step, fed


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_backend_matches_reference_in_every_bucket(family: str, backend: str) -> None:
    if backend == "flashinfer" and not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    ref = _model(family, "torch", graphs=False)
    fast = _model(family, backend, graphs=True)
    assert fast.nanoflow.attention_backend.name == backend
    assert fast.nanoflow.runner.cuda_graphs is not None, fast.nanoflow.runner.cuda_graphs_off_reason
    graph_steps = fast.nanoflow.runner.stats["graph_steps"]
    for batch in BATCH_SIZES:
        want, fed = _run_stream(ref, batch, None)
        got, _ = _run_stream(fast, batch, fed)
        for step, (w, g) in enumerate(zip(want, got)):
            if not w.numel():
                continue
            scale = w.abs().max().item()
            diff = (w - g).abs().max().item()
            assert diff <= TOLERANCE * scale, f"batch {batch} step {step}: max |diff| {diff:.4g}, scale {scale:.4g}"
            top2 = w.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2 * TOLERANCE * scale
            assert torch.equal(g.argmax(-1)[clear], w.argmax(-1)[clear])
    assert fast.nanoflow.runner.stats["graph_steps"] > graph_steps  # decode steps replayed graphs


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_fp8_kv_cache_backend_matches_reference_in_every_bucket(family: str, backend: str) -> None:
    """Over an FP8 (e4m3) cache: the backend (CUDA graphs on, every decode bucket hit) against the torch reference
    (graphs off), both reading the same e4m3 values (the same fused write) with the same non-trivial scales, set
    after the graphs were captured (a Triton replay reads the scales' current values; FlashInfer's graphs, which took
them as host floats, are captured again): within the bf16 tolerance above."""
    if backend == "flashinfer" and not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    ref = _model(family, "torch", graphs=False, kv_cache_dtype="fp8_e4m3")
    fast = _model(family, backend, graphs=True, kv_cache_dtype="fp8_e4m3")
    assert fast.nanoflow.kv_cache.dtype == torch.float8_e4m3fn and fast.nanoflow.attention_backend.name == backend
    assert_fp8_streams_agree(ref, fast)


def assert_fp8_streams_agree(ref: torch.nn.Module, fast: torch.nn.Module) -> None:
    """Two engines over FP8 caches (`fast` with CUDA graphs): the same non-trivial scales set in both after the
    graphs were captured, then the same token streams at every batch size, logits within TOLERANCE step by step, and
    `fast`'s decode steps replayed graphs."""
    assert fast.nanoflow.runner.cuda_graphs is not None, fast.nanoflow.runner.cuda_graphs_off_reason
    layers = len(fast.nanoflow.layers)
    scales = [(0.01 * (1 + i), 0.02 / (1 + i)) for i in range(layers)]  # (a value clamped is clamped in both)
    for model in (ref, fast):
        model.nanoflow.kv_cache.set_scales(scales)
    graph_steps = fast.nanoflow.runner.stats["graph_steps"]
    for batch in BATCH_SIZES:
        want, fed = _run_stream(ref, batch, None)
        got, _ = _run_stream(fast, batch, fed)
        for step, (w, g) in enumerate(zip(want, got)):
            if w.numel():
                diff, scale = (w - g).abs().max().item(), w.abs().max().item()
                assert diff <= TOLERANCE * scale, f"batch {batch} step {step}: max |diff| {diff:.4g}, scale {scale:.4g}"
    assert fast.nanoflow.runner.stats["graph_steps"] > graph_steps  # decode steps replayed graphs


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_inductor_pieces_match_reference_in_every_bucket(family: str, backend: str) -> None:
    """inductor=True (fused pieces between the attention calls), replayed in CUDA graphs, against the reference."""
    if backend == "flashinfer" and not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    ref = _model(family, "torch", graphs=False)
    fast = _model(family, backend, graphs=True, inductor=True)
    assert fast.nanoflow.runner.cuda_graphs is not None, fast.nanoflow.runner.cuda_graphs_off_reason
    for batch in BATCH_SIZES:
        want, fed = _run_stream(ref, batch, None)
        got, _ = _run_stream(fast, batch, fed)
        for w, g in zip(want, got):
            if w.numel():
                assert (w - g).abs().max().item() <= TOLERANCE * w.abs().max().item()


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_graph_replay_equals_eager_steps(backend: str) -> None:
    """The same backend with and without CUDA graphs: equal logits within bf16 rounding (not bitwise: a graph
    step is padded to its bucket, so GEMMs see more rows and may pick other kernels, and FlashInfer may split
    attention work differently in graph mode)."""
    if backend == "flashinfer" and not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    eager = _model("llama", backend, graphs=False)
    graphs = _model("llama", backend, graphs=True)
    for batch in BATCH_SIZES:
        want, fed = _run_stream(eager, batch, None)
        got, _ = _run_stream(graphs, batch, fed)
        for w, g in zip(want, got):
            if not w.numel():
                continue
            assert (w - g).abs().max().item() <= TOLERANCE * w.abs().max().item()


def test_generate_with_flashinfer_is_greedy_consistent() -> None:
    """generate() end to end on FlashInfer (async loop, graphs): as many tokens as asked, and the same output
    twice (nothing depends on stale state between calls)."""
    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model("llama", "flashinfer", graphs=True)
    ids = torch.randint(3, 512, (5, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    first = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    second = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert first.shape == (5, 60) and torch.equal(first, second)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_decode_steps_never_wait_for_the_gpu(backend: str, kv_cache_dtype: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's per-step work in steady decode (schedule, build + copy inputs, plan, replay, sample, store
    tokens, start the readback) makes no synchronising CUDA call: torch's sync debug mode turns any into an error.
    (Reading tokens back, MAX_LAG steps later, is deliberate: the window is kept free of it.) An FP8 cache's scales
    stay on the device."""
    if backend == "flashinfer" and not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    from nanoflow_fx.runtime import engine as engine_module
    from nanoflow_fx.runtime.sampling import SamplingParams

    model = _model("llama", backend, graphs=True, kv_cache_dtype=kv_cache_dtype)
    engine, runner = model.nanoflow.engine, model.nanoflow.runner
    params = SamplingParams(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(2,),
                            min_new_tokens=8)
    requests = [engine.add_request([5 + i] * (20 + i), params, 16) for i in range(8)]
    while any(r.num_cached < len(r.prompt) for r in requests):  # prefill (eager steps), then one decode
        engine.step()
    engine.step()
    graph_steps = runner.stats["graph_steps"]
    monkeypatch.setattr(engine_module, "MAX_LAG", 100)  # no readback inside the window
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.stats["graph_steps"] == graph_steps + 4
    monkeypatch.setattr(engine_module, "MAX_LAG", 2)
    engine.run_until_done(requests)
    assert all(len(r.output) == 16 for r in requests)  # min_new_tokens=8 keeps EOS (2) out until then


def _greedy_within_tolerance(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> bool:
    """Whether every generated token is a greedy choice of the eager model (bf16) on its own prefix, within the
    tolerance: its logit at most 2^-5 of the largest logit below the maximum. (Greedy sequences of two bf16 runs
    may part at a near-tie and then differ everywhere; each token must still be a right choice.)"""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated], device="cuda")).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    chosen = rows.gather(1, torch.tensor(generated, device="cuda")[:, None])[:, 0]
    return bool((chosen >= rows.max(-1).values - TOLERANCE * rows.abs().max(-1).values).all())


def test_engine_in_bf16_makes_greedy_choices_with_and_without_preemption() -> None:
    """The engine on a 16-request table, then on a cache so small that requests are preempted (recomputed from
    prompt plus generated tokens): 24 requests of 24 tokens each, every token a greedy choice of the eager model
    within bf16 tolerance (see `_greedy_within_tolerance`)."""
    from transformers import GenerationConfig

    model = _model("llama", "auto", graphs=True)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(10, 120, (24,), generator=gen)]
    config = GenerationConfig(max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=-1)
    batched = model.generate_batch(prompts, generation_config=config)
    small = nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(
        max_batch_size=16, max_seq_len=160, page_size=16, max_num_tokens=256, num_pages=40, interim_attention=False))
    runtime = small.nanoflow
    runtime.engine = Engine(runtime.runner, runtime.config, reserve_ratio=0.0)  # admit eagerly: preempt later
    preempted = small.generate_batch(prompts, generation_config=config)
    assert runtime.engine.stats.preemptions > 0
    for results in (batched, preempted):
        assert [len(r.generated_tokens) for r in results.values()] == [24] * 24
        for prompt, result in zip(prompts, results.values()):
            assert _greedy_within_tolerance(small, prompt, result.generated_tokens), result.request_id

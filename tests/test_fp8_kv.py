"""FP8 (e4m3) KV cache (`NanoFlowConfig.kv_cache_dtype="fp8_e4m3"`), on the CPU (Triton through its interpreter):

- the KV write scales, clamps to +-448 and rounds to nearest even, never stores inf or NaN, and the Triton kernel
  stores the reference's bits;
- every CPU-runnable attention kernel over an e4m3 cache equals fp32 attention over the dequantised cache (tight)
  and stays within e4m3's rounding of fp32 attention over the original values (loose), head dims 64/128/256,
  sliding windows, soft-capping;
- outliers: a few K channels 1000x larger clamp at scales of 1.0 (the loose check fails by far, and `optimize()`
  warns), and pass with calibrated scales;
- the engine over an FP8 cache (tiny fp32 models) generates what HF's eager model generates attending over K/V
  fake-quantised the same way (tests/reference.py, spelled out apart from nanoflow_fx), logits to fp32 rounding;
- scales from the model's k_scale/v_scale tensors or calibrated; config errors; KV sizing; the keys that must
  tell an FP8 step from another.
The GPU backends (Triton, FlashInfer) over e4m3 pages are tested in tests/test_gpu_backends.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoflow_fx
from nanoflow_fx.ops.backend import AttentionConfig
from nanoflow_fx.runtime import Chunk
from tests import triton_interpreter  # noqa: F401  (must precede the kernels' import)
from tests.helpers import DEFAULT_CONFIG, DEVICES, NO_EOS, PAD, left_padded_batch
from tests.reference import eager_logits_and_kv, fake_quantize_fp8, fp8_kv_attention
from tests.steps import admit, program_runners, release, run, runner_on
from tests.tiny_models import build

E4M3 = torch.float8_e4m3fn
FP8 = dataclasses.replace(DEFAULT_CONFIG, kv_cache_dtype="fp8_e4m3")
# e4m3 keeps 3 mantissa bits: rounding to nearest changes a value in its normal range (>= 2^-6 x scale) by at most
# 2^-4 of itself, and a subnormal one by at most half the smallest step, 2^-10 x scale.
E4M3_REL, E4M3_SUBNORMAL_ABS = 2**-4, 2**-10
# Attention over e4m3 K/V against fp32 attention over the original values: with unit-variance inputs, each element
# is off by up to 2^-4 of itself (about 2^-4 / sqrt(3) in RMS); the output averages V's errors, and K's move the
# scores (std ~1) by about as much: measured ~0.03 relative RMS. The loose check allows 2^-4.
LOOSE_RMS = 2**-4
needs_triton = pytest.mark.skipif(not triton_interpreter.AVAILABLE, reason="needs the triton package")


def _rms_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).pow(2).mean().sqrt() / want.float().pow(2).mean().sqrt()).item()


# ------------------------------------------------------------------------------------------------------ KV write
finite_or_inf = st.floats(width=32, allow_nan=False)  # +-inf included: what an overflowed activation gives


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_or_inf, min_size=8, max_size=8 * 6), scale=st.floats(2**-12, 2**12, width=32),
       seed=st.integers(0, 99))
def test_fp8_write_scales_clamps_and_stores_no_inf_or_nan(values: list[float], scale: float, seed: int) -> None:
    """Every value is stored as x / scale rounded to e4m3 (within e4m3's rounding), values beyond 448 x scale
    (outliers, +-inf) as +-448, and nothing stored is inf or NaN."""
    from nanoflow_fx.ops.reference import write_kv_

    x = torch.tensor(values + [0.0] * (-len(values) % 8), dtype=torch.float32).view(-1, 1, 8)  # [T, 1 head, D 8]
    tokens = x.shape[0]
    cache = torch.zeros(tokens + 1, 2, 1, 1, 8, dtype=E4M3)  # page size 1
    slots = torch.randperm(tokens + 1, generator=torch.Generator().manual_seed(seed))[:tokens]
    kv_scale = torch.tensor([scale, 2 * scale])
    write_kv_(cache, x, -x, slots, kv_scale)
    for half, sign, s in ((0, 1, scale), (1, -1, 2 * scale)):
        stored = cache[slots, half, 0].float()  # [T, 1, 8]
        assert torch.isfinite(stored).all() and stored.abs().max() <= 448
        ratio = sign * x / s
        beyond = ratio.abs() > 448
        assert torch.equal(stored[beyond], 448 * ratio[beyond].sign())
        error = (stored * s - sign * x).abs()[~beyond]
        bound = torch.maximum(E4M3_REL * x.abs()[~beyond], torch.full_like(error, E4M3_SUBNORMAL_ABS * s))
        assert (error <= bound * (1 + 1e-6)).all()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(page=st.sampled_from([1, 4, 16]), heads=st.integers(1, 3), dim=st.sampled_from([8, 16, 64]),
       tokens=st.integers(1, 12), half=st.booleans(), outliers=st.booleans(), seed=st.integers(0, 99),
       scales=st.tuples(st.floats(2**-8, 2**4), st.floats(2**-8, 2**4)))
def test_triton_fp8_write_stores_the_references_bits(device: str, page: int, heads: int, dim: int, tokens: int,
                                                     half: bool, outliers: bool, seed: int,
                                                     scales: tuple[float, float]) -> None:
    """The fused write (Triton's interpreter on the CPU; the kernel on the GPU) stores exactly the reference's e4m3
    bytes (division rounded to nearest, clamp, round to nearest even), outliers and +-inf included, from fp32 or
    fp16 activations; slots it does not write keep their bytes."""
    from nanoflow_fx.ops.kv_write import write_kv_triton
    from nanoflow_fx.ops.reference import write_kv_

    gen = torch.Generator().manual_seed(seed)
    num_pages = -(-tokens // page) + 2
    dtype = torch.float16 if half else torch.float32
    qkv = torch.randn(tokens, 3 * heads * dim, generator=gen)
    if outliers:  # a few channels past the range at these scales, and an overflowed one
        qkv[:, heads * dim : heads * dim + 3] *= 5000
        qkv[0, heads * dim + 3] = float("inf")
    qkv = qkv.to(device=device, dtype=dtype)
    k = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)  # strided views, as the capture gives
    v = qkv[:, 2 * heads * dim :].view(tokens, heads, dim)
    slots = torch.randperm(num_pages * page, generator=gen)[:tokens].to(device)
    kv_scale = torch.tensor(scales, dtype=torch.float32, device=device)
    cache = torch.randn(num_pages, 2, page, heads, dim, generator=gen).to(device=device, dtype=E4M3)
    want, got = cache.clone(), cache.clone()
    write_kv_(want, k, v, slots, kv_scale)
    write_kv_triton(got, k, v, slots, kv_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.isfinite(got.float()).all()


# ----------------------------------------------------------------------------------------------------- attention
def _paged_kv(gen: torch.Generator, page: int, heads_kv: int, dim: int, kv_lens: list[int],
              k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Requests' K/V ([sum(kv_lens), Hkv, D] each, unit variance unless `k` is given) written into a paged fp32
    cache at random pages: (cache, k, v, [kv_indptr, kv_indices, kv_last_page_len] as int32)."""
    total = sum(kv_lens)
    k = torch.randn(total, heads_kv, dim, generator=gen) if k is None else k
    v = torch.randn(total, heads_kv, dim, generator=gen)
    pages = [-(-n // page) for n in kv_lens]
    order = torch.randperm(sum(pages) + 1, generator=gen).tolist()
    kvp, kvi, last, slots = [0], [], [], []
    for n, p in zip(kv_lens, pages):
        ids = [order.pop() for _ in range(p)]
        kvi += ids
        kvp.append(len(kvi))
        last.append(n - (p - 1) * page)
        slots += [ids[t // page] * page + t % page for t in range(n)]
    cache = torch.zeros(sum(pages) + 1, 2, page, heads_kv, dim)
    from nanoflow_fx.ops.reference import write_kv_

    write_kv_(cache, k, v, torch.tensor(slots))
    meta = [torch.tensor(x, dtype=torch.int32) for x in (kvp, kvi, last)]
    return cache, k, v, meta


def _to_fp8(cache: torch.Tensor, kv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 cache's e4m3 copy (as the KV write stores it) and that copy's dequantised values in fp32."""
    stored = torch.stack([(cache[:, i] / kv_scale[i]).clamp(-448, 448).to(E4M3) for i in (0, 1)], dim=1)
    dequantised = torch.stack([stored[:, i].float() * kv_scale[i] for i in (0, 1)], dim=1)
    return stored, dequantised


def _kernel(backend: str) -> Any:
    from nanoflow_fx.ops.backend import get

    return get(backend).kernel


@st.composite
def attention_cases(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    page = draw(st.sampled_from([4, 16]))
    group = draw(st.sampled_from([1, 4]))
    requests = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 24)), min_size=1, max_size=3))
    window = draw(st.sampled_from([0, 3, 8]))
    softcap = draw(st.sampled_from([0.0, 2.0]))
    calibrated = draw(st.booleans())  # scales from the values' range, or 1.0
    return page, group, requests, window, softcap, calibrated


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dim", [64, 128, 256])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases(), seed=st.integers(0, 999))
def test_fp8_attention_equals_attention_over_the_dequantised_cache(backend: str, dim: int, case: Any,
                                                                   seed: int) -> None:
    """Tight against fp32 attention over the dequantised cache (the torch reference to fp32 rounding; Triton's
    fp32 "ieee" dots to its reordering, 1e-5 as for a plain cache), loose against the original values."""
    from nanoflow_fx.ops.reference import paged_attention_reference

    page, group, requests, window, softcap, calibrated = case
    gen = torch.Generator().manual_seed(seed)
    heads_kv = 2
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, page, heads_kv, dim, [q + c for q, c in requests])
    qo = torch.tensor([0, *torch.tensor([q for q, _ in requests]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qo[-1]), heads_kv * group, dim, generator=gen)
    kv_scale = (torch.tensor([k.abs().max() * 2 / 448, v.abs().max() * 2 / 448]) if calibrated
                else torch.ones(2))
    stored, dequantised = _to_fp8(cache, kv_scale)
    meta, scaling = (qo, kvp, kvi, last), dim**-0.5
    got = _kernel(backend)(q, stored, *meta, scaling, window, softcap, kv_scale)
    tight = paged_attention_reference(q, dequantised, *meta, scaling, window, softcap)
    assert (got - tight).abs().max().item() <= (1e-6 if backend == "torch" else 1e-5)
    assert _rms_rel(got, paged_attention_reference(q, cache, *meta, scaling, window, softcap)) <= LOOSE_RMS


@needs_triton
@pytest.mark.parametrize("pv_precision", ["tf32", "half"])
def test_triton_fp8_attention_with_a_half_query_is_within_its_rounding(pv_precision: str) -> None:
    """fp16 queries over an e4m3 cache (K converted to fp16 in registers, exact; P @ V in tf32 or with P rounded to
    fp16): within a few fp16 roundings of fp32 attention over the dequantised cache, as for a half cache."""
    from nanoflow_fx.ops.reference import paged_attention_reference
    from nanoflow_fx.ops.triton_attention import paged_attention_triton

    gen = torch.Generator().manual_seed(0)
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, 16, 2, 64, [37, 1, 70])
    kv_scale = torch.tensor([0.02, 0.015])
    stored, dequantised = _to_fp8(cache, kv_scale)
    qo = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # one decode row per request
    q = torch.randn(3, 8, 64, generator=gen).half()
    meta = (qo, kvp, kvi, last)
    want = paged_attention_reference(q.float(), dequantised, *meta, 0.125, 0, 0.0)
    got = paged_attention_triton(q, stored, *meta, 0.125, 0, 0.0, kv_scale, pv_precision=pv_precision, block_n=32)
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max().item() <= 4 * 2**-11 * want.abs().max().item()
    with pytest.raises(ValueError, match="half type"):  # an fp32 query: "half" would round P below fp32
        paged_attention_triton(q.float(), stored, *meta, 0.125, 0, 0.0, kv_scale, pv_precision="half")


@needs_triton
@pytest.mark.parametrize("q_size", [1.0, 3e5])
def test_triton_fp8_attention_with_fp16_dots_is_within_a_bf16_querys_rounding(q_size: float) -> None:
    """A bf16 query over an e4m3 cache with `dots="fp16"` (Q, K, V and P in fp16: e4m3 converts to fp16 more cheaply
    than to bf16): within a few bf16 roundings of fp32 attention over the dequantised cache, as the bf16 dots are,
    also for a query beyond fp16's range (3e5: scaled by a power of two into it, unscaled in the softmax scale)."""
    from nanoflow_fx.ops.reference import paged_attention_reference
    from nanoflow_fx.ops.triton_attention import paged_attention_triton

    gen = torch.Generator().manual_seed(1)
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, 16, 2, 64, [37, 1, 70])
    kv_scale = torch.tensor([0.02, 0.015])
    stored, dequantised = _to_fp8(cache, kv_scale)
    qo = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    q = (torch.randn(3, 8, 64, generator=gen) * q_size).bfloat16()
    meta, scaling = (qo, kvp, kvi, last), 0.125 / q_size
    want = paged_attention_reference(q.float(), dequantised, *meta, scaling, 0, 0.0)
    got = paged_attention_triton(q, stored, *meta, scaling, 0, 0.0, kv_scale, pv_precision="half", dots="fp16",
                                 block_n=32)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() <= 4 * 2**-8 * want.abs().max().item()
    bf16_dots = paged_attention_triton(q, stored, *meta, scaling, 0, 0.0, kv_scale, pv_precision="half", block_n=32)
    assert not torch.equal(got, bf16_dots)  # (the fp16 dots ran: P rounds finer in fp16 than in bf16)
    with pytest.raises(ValueError, match="dots='fp16'"):  # (P @ V in tf32 keeps V in fp32: nothing to gain)
        paged_attention_triton(q, stored, *meta, scaling, 0, 0.0, kv_scale, pv_precision="tf32", dots="fp16")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_k_outliers_fail_the_loose_check_at_scale_one_and_pass_calibrated(backend: str, dim: int) -> None:
    """An eighth of the K channels 1000x larger (the matching query channels 1000x smaller: the exact attention
    is that of unit-variance inputs): at scales of 1.0 those keys clamp to +-448 and the output misses the loose
    bound by far (measured ~3x); calibrated scales (2 x amax / 448) hold them and pass it."""
    from nanoflow_fx.ops import kv_quant
    from nanoflow_fx.ops.reference import paged_attention_reference

    gen = torch.Generator().manual_seed(dim)
    heads_kv, channels, lens = 2, list(range(dim // 8)), [150, 40]
    k = torch.randn(sum(lens), heads_kv, dim, generator=gen)
    k[:, :, channels] *= 1000
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, 16, heads_kv, dim, lens, k)
    qo = torch.tensor([0, 30, 31], dtype=torch.int32)  # a prefill chunk and a decode row
    q = torch.randn(31, 2 * heads_kv, dim, generator=gen)
    q[:, :, channels] /= 1000
    meta, scaling = (qo, kvp, kvi, last), dim**-0.5
    want = paged_attention_reference(q, cache, *meta, scaling, 0, 0.0)
    errors = {}
    for name, kv_scale in (("1.0", torch.ones(2)), ("calibrated", torch.tensor(
            [kv_quant.scale_from_amax(k.abs().max().item()), kv_quant.scale_from_amax(v.abs().max().item())]))):
        stored, _ = _to_fp8(cache, kv_scale)
        errors[name] = _rms_rel(_kernel(backend)(q, stored, *meta, scaling, 0, 0.0, kv_scale), want)
    assert errors["1.0"] > 2 * LOOSE_RMS and errors["calibrated"] <= LOOSE_RMS, errors


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (24, 0.0), (0, 20.0)])
def test_gpu_fp8_attention_is_within_bf16_rounding_of_the_dequantised_cache(backend: str, dim: int, window: int,
                                                                           softcap: float) -> None:
    """bf16 queries over an e4m3 cache on the GPU, decode rows and prefill rows in one step (FlashInfer: its decode
    and prefill wrappers, planned with kv_data_type=e4m3, the scales given as host floats and as device tensors):
    within a few bf16 roundings (2^-6 of the largest output) of fp32 attention over the dequantised cache, and
    within the loose bound of the original values."""
    import importlib.util

    from nanoflow_fx.ops.backend import get
    from nanoflow_fx.ops.reference import paged_attention_reference

    if backend == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer is not installed")
    gen = torch.Generator().manual_seed(dim)
    heads_kv, group, page = 2, 4, 16
    kv_lens, q_lens = [300, 17, 130, 64], [1, 1, 40, 9]  # two decode rows first, then two prefill chunks
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, page, heads_kv, dim, kv_lens)
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qo[-1]), heads_kv * group, dim, generator=gen)
    kv_scale = torch.tensor([k.abs().max() * 2 / 448, v.abs().max() * 2 / 448])
    stored, dequantised = _to_fp8(cache, kv_scale)
    scaling = dim**-0.5
    want = paged_attention_reference(q, dequantised, qo, kvp, kvi, last, scaling, window, softcap)
    original = paged_attention_reference(q, cache, qo, kvp, kvi, last, scaling, window, softcap)
    cuda = torch.device("cuda")
    meta = [t.to(cuda) for t in (qo, kvp, kvi, last)]
    q16, stored, kv_scale = q.to(cuda, torch.bfloat16), stored.to(cuda), kv_scale.to(cuda)
    kernel = get(backend)
    if backend == "triton":
        outputs = [kernel.run(q16, stored, *meta, scaling, window, softcap, kv_scale)]
    else:  # the scales as host floats (as the engine's cache gives them), then as device tensors (the fallback)
        config = AttentionConfig(heads_kv * group, heads_kv, dim, scaling, window, softcap)
        host = (float(kv_scale[0]), float(kv_scale[1]))
        outputs = []
        for scale_values in (lambda _: host, None):
            planner = kernel.make_planner([config], page, torch.bfloat16, cuda, kv_dtype=E4M3,
                                          scale_values=scale_values)
            plan = planner.plan_tables(qo.pin_memory(), kvp.pin_memory(), last.pin_memory(), meta[2])
            outputs.append(kernel.run_planned(plan, config, q16, stored, meta, None, kv_scale))
    for got in (out.float().cpu() for out in outputs):
        assert (got - want).abs().max().item() <= 2**-6 * want.abs().max().item()
        assert _rms_rel(got, original) <= LOOSE_RMS


# -------------------------------------------------------------------------------------------------------- engine
def _with_checkpoint_scales(model: torch.nn.Module, scales: list[tuple[float, float]]) -> torch.nn.Module:
    """`model` with `k_scale`/`v_scale` buffers on its attention modules, as an FP8 checkpoint's loader leaves them."""
    for (k_scale, v_scale), layer in zip(scales, model.model.layers):
        attention = layer.self_attn
        attention.register_buffer("k_scale", torch.tensor(k_scale))
        attention.register_buffer("v_scale", torch.tensor(v_scale))
    return model


def _hf_fp8_generate(family: str, scales: list[tuple[float, float]], ids: torch.Tensor, mask: torch.Tensor,
                     **build_kw: Any) -> torch.Tensor:
    with fp8_kv_attention(build(family, **build_kw), scales) as reference:
        return reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  eos_token_id=NO_EOS, pad_token_id=PAD)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_engine_over_an_fp8_cache_equals_eager_attention_over_fake_quantised_kv(family: str) -> None:
    """A llama of 4 layers with its checkpoint's scales, different in every layer (three layers traced, the fourth
    replicated: it must read its own), a gemma2 (soft-capping, sliding windows) with calibrated scales (its checkpoint's
    ignored): greedy generate() of a left-padded batch token for token as HF's eager model attending over K/V
    fake-quantised with the same scales; the probe's logits to fp32 rounding of it, and measurably off the unquantised
    model's."""
    build_kw = {"num_hidden_layers": 4} if family == "llama" else {}
    checkpoint = [(0.01 * (i + 1), 0.02 / (i + 1)) for i in range(build(family, **build_kw).config.num_hidden_layers)]
    config = dataclasses.replace(FP8, calibrate_kv_scales=family == "gemma2")
    model = nanoflow_fx.optimize(_with_checkpoint_scales(build(family, **build_kw), checkpoint), config)
    cache = model.nanoflow.kv_cache
    assert cache.dtype == E4M3 and cache.model_dtype == torch.float32 and cache.num_bytes == sum(
        c.numel() for c in cache.caches)  # one byte an element
    scales = cache.scale_values
    if family == "llama":
        assert model.nanoflow.step_fn.replicated is not None  # (a wrong layer's scale would fail its check)
        assert scales == [(pytest.approx(k), pytest.approx(v)) for k, v in checkpoint]
    else:  # calibrated: powers of two, not the checkpoint's
        assert all(s != c for s, c in zip(scales, checkpoint))
        assert all(math.log2(x).is_integer() for pair in scales for x in pair)
    ids, mask = left_padded_batch([3, 9, 5])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=NO_EOS,
                         pad_token_id=PAD)
    assert torch.equal(got, _hf_fp8_generate(family, scales, ids, mask, **build_kw))

    prompts = [ids[0, -3:].tolist(), ids[1].tolist()]
    logits = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    reference = build(family, **build_kw)
    with torch.no_grad(), fp8_kv_attention(reference, scales):
        want = torch.cat([reference(torch.tensor([p])).logits[0] for p in prompts])
    plain = torch.cat([eager_logits_and_kv(reference, p)[0] for p in prompts])
    scale = want.abs().max().item()
    assert (logits - want).abs().max().item() <= 1e-4 * scale
    assert (logits - plain).abs().max().item() > 1e-3 * scale  # the cache really rounds


def test_nanobatched_steps_over_an_fp8_cache_equal_eager_attention_over_fake_quantised_kv() -> None:
    """Steps cut into two nano-batches (each writes and attends its own rows with the layer's scales) generate what
    HF's eager model does over K/V fake-quantised with the same (calibrated) scales."""
    config = dataclasses.replace(FP8, calibrate_kv_scales=True, num_nanobatches=2)
    model = nanoflow_fx.optimize(build("llama"), config)
    ids, mask = left_padded_batch([3, 9, 5])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=NO_EOS,
                         pad_token_id=PAD)
    assert torch.equal(got, _hf_fp8_generate("llama", model.nanoflow.kv_cache.scale_values, ids, mask))
    assert program_runners(model)[0].last_schedule is not None  # (steps were really cut)


@needs_triton
def test_triton_backend_over_an_fp8_cache_equals_the_torch_backend() -> None:
    """gemma2 (soft-capping, sliding windows) over an FP8 cache with calibrated scales: the Triton kernel
    (interpreted) generates what the torch reference kernel does."""
    ids, mask = left_padded_batch([3, 9, 5])
    config = dataclasses.replace(FP8, calibrate_kv_scales=True)
    torch_model = nanoflow_fx.optimize(build("gemma2"), config)
    want = torch_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model = nanoflow_fx.optimize(build("gemma2"), dataclasses.replace(config, attention_backend="triton"))
    assert model.nanoflow.attention_backend.name == "triton"
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), want)


def _outlier_llama() -> torch.nn.Module:
    """A tiny llama whose keys have outliers, as LLMs' keys do: a bias of 1000 on head 0's rotary channel pair
    (0, d/2) (input-independent, so any prompt's keys reach about what the probe's do), where the other keys stay
    below ~1."""
    model = build("llama", num_hidden_layers=3, attention_bias=True)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias[[0, d // 2]] = 1000.0
    return model


def test_outlier_keys_clamp_at_scale_one_with_a_warning_and_are_kept_calibrated(
        caplog: pytest.LogCaptureFixture) -> None:
    """The engine's cache after a prompt, against the keys the eager model computes in layer 0 (later layers' keys
    depend on the attention before them, which the cache's rounding moves): with scales of 1.0 the outlier keys are
    clamped (the largest off by more than half its size) and `optimize()` said so; calibrated, every key is within
    e4m3's rounding of its value, and nothing is said."""
    prompt = torch.randint(3, 90, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    _, want_kv = eager_logits_and_kv(_outlier_llama(), prompt)
    want_k = want_kv[0][0]
    k_max = want_k.abs().max().item()
    assert k_max > 2 * 448  # (the case is what it claims: keys far past e4m3's range at scale 1.0)
    for calibrate in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
            model = nanoflow_fx.optimize(_outlier_llama(), dataclasses.replace(FP8, calibrate_kv_scales=calibrate))
        warned = "exceed the FP8 KV cache's range" in caplog.text
        runner = runner_on(model, num_pages=16, page_size=4)
        [request] = admit(runner, [prompt], max_new_tokens=0)
        run(runner, [Chunk(request, len(prompt))])
        k, _ = runner.kv_cache.read(0, request.pages, len(prompt))
        k_scale = runner.kv_cache.scale_values[0][0]
        release(runner, [request])
        slack = torch.clamp(E4M3_REL * want_k.abs(), min=E4M3_SUBNORMAL_ABS * k_scale)
        beyond_rounding = ((k - want_k).abs() / slack).max().item()  # > 1: a key off by more than e4m3's rounding
        if calibrate:
            assert not warned and beyond_rounding <= 1 + 1e-5, caplog.text
        else:  # the largest key stored as 448: off by k_max - 448 > k_max / 2
            max_error = (k - want_k).abs().max().item()
            assert warned and max_error >= (k_max - 448) * (1 - 1e-5) and max_error > k_max / 2


def test_the_references_fake_quantisation_is_what_the_cache_stores() -> None:
    """tests/reference.py's fake quantisation and the cache agree to the bit on layer 0's keys and values (later
    layers' K/V depend on the attention before them, which the cache's rounding moves)."""
    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(FP8, calibrate_kv_scales=True))
    prompt = list(range(3, 14))
    _, want_kv = eager_logits_and_kv(build("llama"), prompt)
    runner = runner_on(model, num_pages=8, page_size=4)
    [request] = admit(runner, [prompt], max_new_tokens=0)
    run(runner, [Chunk(request, len(prompt))])
    k, v = runner.kv_cache.read(0, request.pages, len(prompt))
    release(runner, [request])
    (want_k, want_v), (k_scale, v_scale) = want_kv[0], runner.kv_cache.scale_values[0]
    assert torch.equal(k, fake_quantize_fp8(want_k, k_scale)) and torch.equal(v, fake_quantize_fp8(want_v, v_scale))
    assert not torch.equal(k, want_k)  # (it rounds)


def test_the_check_allows_an_fp8_cache_its_own_effect_and_no_more() -> None:
    """`optimize()`'s check over an FP8 cache: the step may differ from the eager model over fake-quantised K/V by
    the tolerance plus as much as the quantisation moves the eager model's logits (a rounding that lands on the
    neighbouring e4m3 value in one of the two moves no further), in the check's own measure; a fault beyond that
    is refused, naming the allowance."""
    from types import SimpleNamespace

    from nanoflow_fx.capture.check import check_probe

    gen = torch.Generator().manual_seed(0)
    want = torch.randn(8, 96, generator=gen)
    rms = want.pow(2).mean(-1, keepdim=True).sqrt()

    def off_by(fraction: float) -> torch.Tensor:  # every row exactly `fraction` of its RMS away (relative RMS)
        noise = torch.randn(8, 96, generator=gen)
        return want + fraction * rms * noise / noise.pow(2).mean(-1, keepdim=True).sqrt()

    unquantised = off_by(0.05)  # the cache's own effect on the eager logits: 0.05 relative RMS per row

    def check(got: torch.Tensor, dtype: torch.dtype, with_cache_effect: bool) -> None:
        runner = SimpleNamespace(run_prompts=lambda prompts, all_logits: got, interim=None,
                                 kv_cache=SimpleNamespace(model_dtype=dtype), backend=SimpleNamespace(name="stub"),
                                 config=SimpleNamespace(linear_dtype="auto"))
        check_probe(build("llama"), runner, [[1]], want, unquantised if with_cache_effect else None)  # type: ignore[arg-type]

    rounding = off_by(0.09)  # bf16: beyond 2^-4 alone, within 2^-4 + 0.05
    check(rounding, torch.bfloat16, True)
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match="0.0625 \\+ 0.05, FP8's own effect"):
        check(off_by(0.2), torch.bfloat16, True)
    with pytest.raises(nanoflow_fx.CaptureMismatchError):
        check(rounding, torch.bfloat16, False)
    slack = (unquantised - want).abs().max().item()  # fp32: max |diff| <= 1e-4 x scale + the cache's own max
    check(want + 0.9 * (unquantised - want), torch.float32, True)
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match="FP8's own effect"):
        check(want + 2 * slack, torch.float32, True)


def test_an_fp8_cache_does_not_hide_a_step_that_differs_from_the_model() -> None:
    """A model whose forward mixes tokens outside attention (the packed step cannot reproduce it) is still refused
    over an FP8 cache, in fp32 and bf16: the allowance for the cache's rounding is far below a capture fault."""
    from tests.helpers import BatchMixingLlama

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = BatchMixingLlama(build("llama").config).to(dtype).eval()
        with pytest.raises(nanoflow_fx.CaptureMismatchError, match="FP8's own effect"):
            nanoflow_fx.optimize(model, FP8)


@settings(max_examples=50, deadline=None)
@given(amax=st.floats(1e-30, 1e30))
def test_calibrated_scales_are_powers_of_two_that_hold_twice_the_range(amax: float) -> None:
    from nanoflow_fx.ops.kv_quant import scale_from_amax

    scale = scale_from_amax(amax)
    assert math.log2(scale).is_integer()
    assert 2 * amax <= 448 * scale < 4 * amax * (1 + 1e-12)


# ---------------------------------------------------------------------------------------- scales from the model
def test_checkpoint_scales_are_read_from_attention_module_tensors() -> None:
    from nanoflow_fx.capture.kv_scales import checkpoint_scales

    assert checkpoint_scales(build("llama"), 2) is None  # none: scales of 1.0
    model = _with_checkpoint_scales(build("llama"), [(0.5, 0.25), (2.0, 4.0)])
    assert checkpoint_scales(model, 2) == [(0.5, 0.25), (2.0, 4.0)]
    legacy = build("llama")  # one `kv_scale` for both; a per-head tensor counts by its largest element
    for i, layer in enumerate(legacy.model.layers):
        layer.self_attn.register_buffer("kv_scale", torch.tensor([0.125, 0.25 + i]))
    assert checkpoint_scales(legacy, 2) == [(0.25, 0.25), (1.25, 1.25)]
    floats = build("llama")  # a float attribute of that name is the model's own arithmetic (Gemma-4), not a scale
    for layer in floats.model.layers:
        layer.self_attn.k_scale = layer.self_attn.v_scale = 1.44
    assert checkpoint_scales(floats, 2) is None
    partial = build("llama")
    _with_checkpoint_scales(partial, [(0.5, 0.25)])
    with pytest.raises(nanoflow_fx.NanoFlowError, match=r"layers \[0\] but not \[1\].*calibrate_kv_scales"):
        checkpoint_scales(partial, 2)
    with pytest.raises(nanoflow_fx.NanoFlowError, match="positive and finite"):
        checkpoint_scales(_with_checkpoint_scales(build("llama"), [(0.5, 0.0), (1.0, 1.0)]), 2)


def test_cache_scales_are_checked_and_set_in_place() -> None:
    from nanoflow_fx.runtime.kv_cache import PagedKVCache

    layers = [AttentionConfig(4, 2, 8, 0.35, 0, 0.0)] * 2
    cache = PagedKVCache(layers, 4, 4, E4M3, torch.device("cpu"), model_dtype=torch.float32)
    assert cache.quantized and cache.scale_values == [(1.0, 1.0)] * 2
    tensors = cache.scales
    cache.set_scales([(0.5, 2.0), (3.0, 0.25)])
    assert cache.scales is tensors and torch.equal(tensors[1], torch.tensor([3.0, 0.25]))  # same tensors: graphs
    for bad, match in (([(1.0, 1.0)], "1 KV scale pairs for 2"), ([(1.0, float("inf"))] * 2, "positive and finite")):
        with pytest.raises(ValueError, match=match):
            cache.set_scales(bad)
    with pytest.raises(ValueError, match="for an FP8 cache"):
        PagedKVCache(layers, 4, 4, torch.float32, torch.device("cpu"), kv_scales=[(1.0, 1.0)] * 2)


def test_a_bf16_models_v_scale_must_keep_an_fp16_output_finite() -> None:
    """A bf16 model attends over e4m3 with its query and output in fp16 (`kv_quant.query_dtype`): values up to
    448 x v_scale must stay within fp16's 65504, so a larger v_scale is refused with the fix named; an fp32 model's
    cache (query in fp32) takes it."""
    from nanoflow_fx.ops import kv_quant
    from nanoflow_fx.runtime.kv_cache import PagedKVCache

    layers = [AttentionConfig(4, 2, 8, 0.35, 0, 0.0)] * 2
    cache = PagedKVCache(layers, 4, 4, E4M3, torch.device("cpu"), model_dtype=torch.bfloat16)
    assert cache.query_dtype == torch.float16
    limit = kv_quant.FP16_MAX / kv_quant.E4M3_MAX  # 146.2
    cache.set_scales([(1000.0, 128.0), (1.0, limit)])  # (k_scale joins the softmax scale in fp32: any is fine)
    with pytest.raises(ValueError, match=r"layers \[1\].*kv_cache_dtype='auto'"):
        cache.set_scales([(1.0, 1.0), (1.0, 256.0)])
    assert cache.scale_values[1] == (1.0, pytest.approx(limit))  # the refused scales are not set
    full = PagedKVCache(layers, 4, 4, E4M3, torch.device("cpu"), model_dtype=torch.float32)
    assert full.query_dtype == torch.float32
    full.set_scales([(1.0, 256.0)] * 2)
    assert PagedKVCache(layers, 4, 4, torch.bfloat16, torch.device("cpu")).query_dtype == torch.bfloat16


def test_calibrating_values_an_fp16_output_cannot_hold_fails_optimize_naming_the_fix() -> None:
    """A bf16 model whose values calibrate v_scale past 146 (v_proj scaled up a million times) is refused by
    optimize() with the fix named, and left as it was: no runtime, its plain forward unchanged."""
    model = build("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e6)
        ids = torch.tensor([[5, 6, 7, 8]])
        before = model(ids).logits
    with pytest.raises(ValueError, match=r"v_scale \d+ .* past 65504.*kv_cache_dtype='auto'"):
        nanoflow_fx.optimize(model, dataclasses.replace(FP8, calibrate_kv_scales=True))
    assert not hasattr(model, "nanoflow")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=16))
def test_the_fp16_query_is_the_bf16_query_within_fp16s_range_and_saturates_beyond(values: list[float]) -> None:
    """`to_query` for fp16: a bf16 value of fp16's normal range converts exactly (fp16 has 3 more significand bits
    than bf16); smaller ones round to fp16's subnormal step (2^-24, far below bf16's own rounding of anything that
    moves a softmax); past +-65504 they saturate there, never inf."""
    from nanoflow_fx.ops import kv_quant

    q = torch.tensor(values).bfloat16()
    got = kv_quant.to_query(q, torch.float16)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    want = q.float().clamp(-kv_quant.FP16_MAX, kv_quant.FP16_MAX)
    normal = want.abs() >= 2.0**-14
    assert torch.equal(got.float()[normal], want[normal])
    assert (got.float() - want).abs().max().item() <= 2.0**-25
    assert kv_quant.to_query(q, torch.bfloat16) is q


def test_a_bf16_models_step_attends_over_e4m3_with_an_fp16_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured step of a bf16 model over an e4m3 cache hands attention an fp16 query (converted in the step, not
    by the kernel) and gets an fp16 output it converts back; the model over a bf16 cache keeps bf16 throughout; the
    step's logits are as close to the fp32 eager model over the same fake-quantised K/V as the bf16 eager model's
    are."""
    from nanoflow_fx.ops import backend as backends

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = backends.resolve

    def recording(name: str) -> Any:
        chosen = real(name)

        class Recorder:
            def run(self, q: torch.Tensor, kv_cache: torch.Tensor, *args: Any) -> torch.Tensor:
                seen.append((q.dtype, kv_cache.dtype))
                out = chosen.run(q, kv_cache, *args)
                assert out.dtype == q.dtype
                return out

        return Recorder()

    monkeypatch.setattr("nanoflow_fx.ops.attention.resolve", recording)
    for kv_cache_dtype, query in (("fp8_e4m3", torch.float16), ("auto", torch.bfloat16)):
        torch.manual_seed(0)
        config = dataclasses.replace(DEFAULT_CONFIG, kv_cache_dtype=kv_cache_dtype, save_step=False)
        model = nanoflow_fx.optimize(build("llama", dtype=torch.bfloat16), config)
        seen.clear()
        ids, mask = left_padded_batch([3, 9, 5])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=NO_EOS,
                             pad_token_id=PAD)
        assert out.shape == (3, ids.shape[1] + 3) and seen
        assert set(seen) == {(query, model.nanoflow.kv_cache.dtype)}
    torch.manual_seed(0)
    model = nanoflow_fx.optimize(build("llama", dtype=torch.bfloat16), FP8)
    prompts = [ids[0, -3:].tolist(), ids[1].tolist()]
    logits = model.nanoflow.runner.run_prompts(prompts, all_logits=True).float()
    want = {}  # the eager model over the same fake-quantised K/V, in fp32 and in bf16
    for dtype in (torch.float32, torch.bfloat16):
        reference = build("llama", dtype=dtype)
        with torch.no_grad(), fp8_kv_attention(reference, model.nanoflow.kv_cache.scale_values):
            want[dtype] = torch.cat([reference(torch.tensor([p])).logits[0] for p in prompts]).float()
    # the step is as close to the fp32 result as the eager bf16 model is (1.02x of its distance when written)
    bf16_distance = (want[torch.bfloat16] - want[torch.float32]).abs().max().item()
    assert 0 < (logits - want[torch.float32]).abs().max().item() <= 1.5 * bf16_distance


# ------------------------------------------------------------------------------------------- config and sizing
@pytest.mark.parametrize(("values", "match"), [
    ({"kv_cache_dtype": "fp8"}, r"kv_cache_dtype='fp8' is not one of \('auto', 'fp8_e4m3'\)"),
    ({"kv_cache_dtype": "float8_e4m3fn"}, "kv_cache_dtype"),
    ({"kv_cache_dtype": torch.float8_e4m3fn}, "kv_cache_dtype"),
    ({"calibrate_kv_scales": True}, "calibrate_kv_scales=True .* needs kv_cache_dtype='fp8_e4m3'"),
    ({"kv_cache_dtype": "fp8_e4m3", "calibrate_kv_scales": "yes"}, "calibrate_kv_scales must be a bool"),
])
def test_invalid_kv_cache_settings_are_refused(values: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nanoflow_fx.NanoFlowConfig(**values)
    with pytest.raises(ValueError, match=match):
        nanoflow_fx.NanoFlowConfig.from_dict(values)


def test_kv_cache_settings_round_trip() -> None:
    config = nanoflow_fx.NanoFlowConfig(kv_cache_dtype="fp8_e4m3", calibrate_kv_scales=True)
    assert nanoflow_fx.NanoFlowConfig.from_dict(config.to_dict()) == config
    assert nanoflow_fx.NanoFlowConfig().kv_cache_dtype == "auto"


def test_an_fp8_page_takes_half_the_bytes_of_a_16_bit_one() -> None:
    """KV sizing (`pages_from_memory` divides the memory left by `page_bytes`): the same memory holds twice the
    pages, so twice the tokens; the CPU default (every sequence at its longest) does not depend on bytes."""
    from nanoflow_fx.runtime.kv_cache import PagedKVCache, page_bytes

    layers = [AttentionConfig(32, 8, 128, 128**-0.5, 0, 0.0)] * 32  # the 8B shape
    assert page_bytes(layers, 16, E4M3) * 2 == page_bytes(layers, 16, torch.bfloat16) == 2**17 * 16  # 128 KiB/token
    assert page_bytes(layers, 16, E4M3) * 4 == page_bytes(layers, 16, torch.float32)
    small = [AttentionConfig(4, 2, 8, 0.35, 0, 0.0)] * 2
    fp8 = PagedKVCache(small, 10, 4, E4M3, torch.device("cpu"), model_dtype=torch.bfloat16)
    bf16 = PagedKVCache(small, 10, 4, torch.bfloat16, torch.device("cpu"))
    assert fp8.num_bytes * 2 == bf16.num_bytes


def test_gpu_memory_sizing_fits_twice_the_pages_of_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pages_from_memory` (the CUDA sizing) on a stand-in device of 8 GiB holding 1 GiB of weights: with FP8 pages
    the memory left holds twice the pages of bf16 ones (the measured step's own cache counted once either way)."""
    from nanoflow_fx.runtime.kv_cache import PagedKVCache, page_bytes, pages_from_memory

    total, weights = 8 * 2**30, 2**30
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=64,
                                        kv_cache_memory_fraction=0.5)
    layers = [AttentionConfig(32, 8, 128, 128**-0.5, 0, 0.0)] * 4

    class ProfileRunner:  # the step the sizing runs (its activations: nothing here)
        def __init__(self, cache: PagedKVCache) -> None:
            self.kv_cache = cache

        def run_prompts(self, prompts: Any) -> torch.Tensor:
            return torch.zeros(len(prompts), 8)

    pages = {}
    for dtype in (torch.bfloat16, E4M3):
        cache = PagedKVCache(layers, 20, 16, dtype, torch.device("cpu"), model_dtype=torch.bfloat16)
        for name, fake in (("empty_cache", lambda: None), ("synchronize", lambda device=None: None),
                           ("reset_peak_memory_stats", lambda device=None: None),
                           ("max_memory_allocated", lambda device=None, c=cache: weights + c.num_bytes),
                           ("memory_allocated", lambda device=None, c=cache: weights + c.num_bytes),
                           ("memory_reserved", lambda device=None, c=cache: weights + c.num_bytes),
                           ("mem_get_info", lambda device=None, c=cache: (total - weights - c.num_bytes, total))):
            monkeypatch.setattr(torch.cuda, name, fake)
        pages[dtype] = pages_from_memory(ProfileRunner(cache), config, 128)
        assert pages[dtype] == (total // 2 - weights) // page_bytes(layers, 16, dtype)
    assert pages[E4M3] == 2 * pages[torch.bfloat16]


@pytest.mark.parametrize(("activations", "kept", "fraction", "cache_gib"), [
    (0, 20, 0.9, 12),  # kept blocks beyond the step's peak count against the fraction: 72 - 60
    (5, 3, 0.9, 27),  # kept blocks the step's activations reuse (its peak is higher): 72 - 45
    (0, 0, 1.0, 39),  # the whole GPU asked for: 1 GiB stays free
])
def test_gpu_memory_sizing_counts_what_the_allocator_keeps(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, activations: int,
                                                           kept: int, fraction: float, cache_gib: int) -> None:
    """A stand-in 80 GiB device holding 40 GiB of weights whose measured step peaks `activations` GiB above them and
    whose allocator then keeps `kept` GiB of free blocks (reserved, not allocated: fragments neither the cache's
    per-layer tensors nor CUDA graphs' pools can use). Reserved memory counts against the fraction like allocated
    memory, so the fraction's remainder stays free for graphs and libraries (an 80-layer 70B shape on an H100 at
    fraction 0.96 ran its graphs and a cuBLAS handle out of memory when ~2.5 GiB of kept blocks were counted as
    usable); at least 1 GiB always stays free; a warning names the allocator setting that gives such blocks back
    where they cost the cache 1 GiB or more."""
    from nanoflow_fx.runtime.kv_cache import PagedKVCache, page_bytes, pages_from_memory

    gib = 2**30
    total, weights = 80 * gib, 40 * gib
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=64,
                                        kv_cache_memory_fraction=fraction)
    layers = [AttentionConfig(32, 8, 128, 128**-0.5, 0, 0.0)] * 4
    cache = PagedKVCache(layers, 20, 16, torch.bfloat16, torch.device("cpu"))

    class ProfileRunner:
        kv_cache = cache

        def run_prompts(self, prompts: Any) -> torch.Tensor:
            return torch.zeros(len(prompts), 8)

    used = weights + cache.num_bytes
    for name, fake in (("empty_cache", lambda: None), ("synchronize", lambda device=None: None),
                       ("reset_peak_memory_stats", lambda device=None: None),
                       ("max_memory_allocated", lambda device=None: used + activations * gib),
                       ("memory_allocated", lambda device=None: used),
                       ("memory_reserved", lambda device=None: used + kept * gib),
                       ("mem_get_info", lambda device=None: (total - used - kept * gib, total))):
        monkeypatch.setattr(torch.cuda, name, fake)
    per_page = page_bytes(layers, 16, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="nanoflow_fx"):
        pages = pages_from_memory(ProfileRunner(), config, 128)
    assert pages == (cache_gib * gib) // per_page
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if kept > activations + 1:
        assert any("expandable_segments:True" in m and f"{kept - activations:.1f} GiB smaller" in m for m in warned)
    else:
        assert not warned, warned


def test_the_cache_dtype_keys_the_saved_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step saved for one cache dtype is never loaded for another (its file key), and a step in memory serves
    only calls over the dtype it was captured for (an FP8 step reads the layers' scales, another has none)."""
    from nanoflow_fx.capture.store import LoadedStep
    from nanoflow_fx.model_runtime import step_store
    from nanoflow_fx.ops.metadata import AttentionMetadata

    monkeypatch.setenv("NANOFLOW_FX_SAVE_STEP", "1")
    model = build("llama")
    paths = {step_store(model, nanoflow_fx.NanoFlowConfig(kv_cache_dtype=d), "L", "torch").path  # type: ignore[union-attr]
             for d in ("auto", "fp8_e4m3")}
    assert len(paths) == 2
    index = torch.zeros(2, dtype=torch.int32)

    def metadata(dtype: torch.dtype) -> AttentionMetadata:
        return AttentionMetadata(index, index, index, index, index.long(), (torch.zeros(1, 2, 4, 2, 8, dtype=dtype),))

    step = LoadedStep(None, ["L['input_ids']"], "torch", 1, str(E4M3))
    assert step.accepts(metadata(E4M3)) and not step.accepts(metadata(torch.float32))


def test_a_backend_that_cannot_read_e4m3_is_not_chosen(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Triton reads e4m3 from compute capability 8.9 on: on an older GPU "auto" falls back to the torch kernel
    (FlashInfer absent here), saying why, and an explicit "triton" is refused with the reason."""
    from nanoflow_fx.ops import backend as backends

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(backends, "_installed", lambda package: package == "triton")
    configs, cuda = [AttentionConfig(4, 2, 64, 0.125, 0, 0.0)], torch.device("cuda")
    assert backends.choose("auto", configs, torch.bfloat16, cuda).name == "triton"  # a bf16 cache: as before
    with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
        assert backends.choose("auto", configs, torch.bfloat16, cuda, E4M3).name == "torch"
    assert "compute capability 8.9" in caplog.text
    with pytest.raises(nanoflow_fx.NanoFlowError, match="triton.*compute capability 8.9"):
        backends.choose("triton", configs, torch.bfloat16, cuda, E4M3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert backends.choose("auto", configs, torch.bfloat16, cuda, E4M3).name == "triton"

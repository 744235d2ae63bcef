"""FP8 linears (`NanoFlowConfig.linear_dtype="fp8_e4m3"`): the per-row quantisation, the `fp8_linears` pass (what
it replaces, and that Inductor fuses the activations' quantisation into the ops before), the engine against a torch
reference that fake-quantises the same tensors (tests/fp8_reference.py), layer replication, the saved step and
nano-batches with it, and a failed `optimize()` that restores the full-precision weights. FP8 models of other
libraries: tests/test_fp8_checkpoints.py; the accuracy on a trained model: tests/test_fp8_accuracy.py."""

from __future__ import annotations

import dataclasses
import gc
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nanoflow_fx
from nanoflow_fx.capture.fp8_weights import quantize_linears
from nanoflow_fx.capture.lowering import FP8_FAST_ACCUM
from nanoflow_fx.ops.fp8 import FP8_MAX, fp8_gemm_error, quantize_rows, scaled_linear
from tests.fp8_reference import (
    FP8,
    TINY,
    close,
    expected_fp8,
    fake_quantised_reference,
    fp8_modules,
    random_prompts,
    scaled_mm_reference,
)
from tests.helpers import DEFAULT_CONFIG, DEVICES, BatchMixingLlama, reference
from tests.steps import program_runners
from tests.tiny_models import build

# -- the arithmetic ----------------------------------------------------------------------------------------------

_rows = hnp.arrays(
    "float32", hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
    elements=st.one_of(st.just(0.0), st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False),
                       st.floats(-2.0**-100, 2.0**-100, width=32, allow_subnormal=False)))


@settings(max_examples=200, deadline=None)
@given(_rows, st.integers(0, 3))
def test_quantize_rows_rounds_each_row_to_e4m3_of_its_own_scale(values: object, zero_row: int) -> None:
    x = torch.tensor(values)
    if zero_row < x.shape[0]:
        x[zero_row] = 0  # an all-zero row stays finite (the scale's floor)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (x.shape[0], 1)
    back = q.float() * scale
    assert torch.isfinite(back).all()
    # e4m3 keeps 3 mantissa bits: normals round within 2^-4 of themselves; subnormals (below 2^-6 of the scale)
    # within half their spacing, 2^-10 of the scale
    bound = 2**-4 * x.abs() + 2**-10 * scale + 1e-6 * x.abs()
    assert ((back - x).abs() <= bound).all()
    amax = x.abs().amax(-1)
    nonzero = amax > 0
    # each nonzero row's largest value lands on e4m3's largest (the range is used), none beyond
    assert (q.float().abs().amax(-1)[nonzero] == FP8_MAX).all() or (scale[nonzero] == TINY).any()


def test_scaled_linear_is_the_dequantised_product() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(7, 48, generator=gen), torch.randn(32, 48, generator=gen), torch.randn(32, generator=gen)
    (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
    got = scaled_linear(xq, xs, wq, ws, bias, torch.float32, use_fast_accum=False)
    want = (xq.float() * xs) @ (wq.float() * ws).t() + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert close(got, x @ w.t() + bias) > 1e-3  # (and FP8 is not exact: the check above is not vacuous)


# -- configuration -----------------------------------------------------------------------------------------------

def test_linear_dtype_is_validated_and_round_trips() -> None:
    for bad in ("fp8", "float8_e4m3fn", "bfloat16", None):
        with pytest.raises(ValueError, match=r"linear_dtype=.*is not one of \('auto', 'fp8_e4m3'\)"):
            nanoflow_fx.NanoFlowConfig(linear_dtype=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="linear_dtype"):
            nanoflow_fx.NanoFlowConfig.from_dict({"linear_dtype": bad})
    config = nanoflow_fx.NanoFlowConfig(linear_dtype="fp8_e4m3")
    assert nanoflow_fx.NanoFlowConfig.from_dict(config.to_dict()) == config
    assert nanoflow_fx.NanoFlowConfig().linear_dtype == "auto"


def test_fp8_linears_refuse_a_model_dtype_they_cannot_compute_in() -> None:
    model = build("llama", dtype=torch.float64)
    with pytest.raises(nanoflow_fx.NanoFlowError, match="linear_dtype='fp8_e4m3'.*not torch.float64"):
        nanoflow_fx.optimize(model, FP8)
    assert not fp8_modules(model)  # refused before anything changed


# -- the pass ----------------------------------------------------------------------------------------------------

def _aten_targets(model: torch.nn.Module) -> Counter[str]:
    (capture,) = model.nanoflow.step_fn.captures
    return Counter(str(n.target) for n in capture.graph.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize(("family", "fuse", "lowered"), [
    # per layer (2 layers): Q/K/V (fused: 1), O, gate/up (fused: 1), down -> 4; unfused 7. Mixtral: only the
    # attention's (Q/K/V fused, O) -> 2; its router and experts stay.
    ("llama", True, 8), ("llama", False, 14), ("mixtral", True, 4)])
def test_the_pass_lowers_every_large_linear_to_one_fp8_gemm(family: str, fuse: bool, lowered: int) -> None:
    model = nanoflow_fx.optimize(build(family), dataclasses.replace(FP8, fuse_linears=fuse))
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3"
    assert fp8_modules(model) == expected_fp8(reference(family))
    (capture,) = model.nanoflow.step_fn.captures
    assert capture.changed("fp8_linears") == lowered
    assert re.search(rf"fp8_linears .* {lowered} changed", str(nanoflow_fx.explain(model)))
    targets = _aten_targets(model)
    assert targets["aten._scaled_mm.default"] == lowered and "nanoflow.fp8_linear.default" not in targets
    # one quantisation per distinct input (per layer: the attention's input and output, the MLP's input and its
    # activation), shared by the linears reading it; the LM head (and Mixtral's two routers) stay plain GEMMs
    assert targets["aten.amax.default"] == 2 * (4 if family == "llama" else 2)
    assert targets["aten.mm.default"] == (1 if family == "llama" else 3)
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32


def test_without_fp8_nothing_changes() -> None:
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    assert model.nanoflow.config.linear_dtype == "auto" and not fp8_modules(model)
    assert "fp8_linears" not in model.nanoflow.lowering.describe()
    assert _aten_targets(model)["aten._scaled_mm.default"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mixtral", "phi3"])
def test_the_engine_equals_a_fake_quantised_reference(family: str) -> None:
    """fp32 on the CPU: the FP8 step's logits are the fake-quantised model's to float rounding, and greedy
    generation gives its tokens (qwen2: biases; gemma2: soft-capping, sliding windows; mixtral: MoE; phi3: its own
    fused Q/K/V and gate/up linears). Exact because in these tiny models no activation lies within fp32 rounding of
    an e4m3 rounding boundary, where the two could round it apart (the capture check's FP8 bound explains why that
    would spread)."""
    model = nanoflow_fx.optimize(build(family), FP8)
    ref = fake_quantised_reference(reference(family), fp8_modules(model))
    prompts = random_prompts()
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert close(got, want) <= 1e-4
    plain = torch.cat([reference(family)(torch.tensor([p])).logits[0] for p in prompts])
    assert close(got, plain) > 1e-3  # FP8 changed the logits: the comparison above is not vacuous
    ids = torch.tensor(prompts[1:2])
    want_ids = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want_ids)


@pytest.mark.cuda
@pytest.mark.parametrize("fast", [True, False])
def test_on_cuda_the_fp8_gemm_adds_a_tenth_of_the_quantisation_error_at_most(fast: bool) -> None:
    """`torch._scaled_mm` on the FP8 tensor cores: each output row is what that row alone gives (the batch does not
    change it), and its accumulation (which on Hopper is not fp32's sum of the exact products) adds at most a tenth
    of the error the quantisation itself makes (against the unquantised product), for the 8B layer's sizes."""
    if fp8_gemm_error(torch.device("cuda"), torch.bfloat16):
        pytest.skip(fp8_gemm_error(torch.device("cuda"), torch.bfloat16))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in ((64, 128), (4096, 6144), (14336, 4096)):
        x = torch.randn(26, k, device="cuda", generator=gen)
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
        exact = ((xq.double() * xs.double()) @ (wq.double() * ws.double()).t())
        quantisation = ((x.double() @ w.double().t()) - exact).norm() / exact.norm()
        for dtype in (torch.float32, torch.bfloat16):
            got = scaled_linear(xq, xs, wq, ws, None, dtype, use_fast_accum=fast)
            rows = torch.cat([scaled_linear(xq[i:i + 1], xs[i:i + 1], wq, ws, None, dtype, use_fast_accum=fast)
                              for i in range(len(x))])
            assert torch.equal(got, rows), (k, n, dtype, (got - rows).abs().max().item())
            error = (got.double() - exact).norm() / exact.norm()
            assert error <= quantisation / 10, (k, n, dtype, error.item(), quantisation.item())


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_on_cuda_with_cuda_graphs_the_engine_equals_the_scaled_mm_reference(family: str) -> None:
    """fp32 on the GPU (Inductor's pieces, `torch._scaled_mm` on the FP8 tensor cores, decode steps replayed as CUDA
    graphs): the logits, to float rounding, and the greedy tokens of a reference that quantises as FP8 linears
    promise and multiplies with the same GEMM. (Not the fake-quantised reference of the CPU tests: the tensor cores'
    accumulation differs from fp32's by a little (the test above bounds it), and FP8 carries a little on: a value
    that lands next to an e4m3 rounding boundary rounds apart in the two, and the next layers see it.)"""
    if fp8_gemm_error(torch.device("cuda"), torch.float32):  # (row-wise fp32 output needs cuBLAS 12.9+ on Hopper)
        pytest.skip(fp8_gemm_error(torch.device("cuda"), torch.float32))
    config = dataclasses.replace(FP8, attention_backend="triton", cuda_graphs=True)
    model = nanoflow_fx.optimize(build(family, device="cuda"), config)
    assert model.nanoflow.runner.cuda_graphs is not None
    ref = scaled_mm_reference(reference(family, device="cuda"), fp8_modules(model), FP8_FAST_ACCUM)
    prompts = random_prompts()
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    want = torch.cat([ref(torch.tensor([p], device="cuda")).logits[0] for p in prompts])
    assert close(got, want) <= 1e-4
    ids = torch.tensor([p[:5] for p in prompts], device="cuda")
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.cuda
def test_the_full_precision_weights_leave_the_gpu() -> None:
    """What FP8 frees is free: after optimize() the GPU holds the FP8 weights (and their scales), not the bf16
    ones, so the KV cache sized from free memory gets it."""
    def build_bf16() -> torch.nn.Module:
        return build("llama", dtype=torch.bfloat16, device="cuda", hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4)

    config = dataclasses.replace(FP8, cuda_graphs=False)
    sizes = {}
    for linear_dtype in ("auto", "fp8_e4m3"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        model = build_bf16()
        quantised = sum(m.weight.numel() for n, m in model.named_modules() if n in expected_fp8(model))
        model = nanoflow_fx.optimize(model, dataclasses.replace(config, linear_dtype=linear_dtype))
        torch.cuda.synchronize()
        sizes[linear_dtype] = torch.cuda.memory_allocated() - before - model.nanoflow.kv_cache.num_bytes
        del model
        gc.collect()  # (the first model gone before the second is measured)
    # 2 bytes per quantised weight in bf16, 1 in FP8 (+ 4 bytes per output channel of scale: small here)
    assert sizes["auto"] - sizes["fp8_e4m3"] >= 0.9 * quantised


def test_replicated_and_saved_fp8_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer replication copies the lowered FP8 layers (each reading its own FP8 weights and scales), and a second
    process loads the saved step: both compute the fake-quantised reference."""
    monkeypatch.delenv("NANOFLOW_FX_SAVE_STEP", raising=False)
    config = dataclasses.replace(FP8, cache_dir=str(tmp_path))
    first = nanoflow_fx.optimize(build("llama", num_hidden_layers=5), config)
    step_fn = first.nanoflow.step_fn
    assert step_fn.replicated is not None and step_fn.captures[0].replicated == (3, 5, 1)
    assert step_fn.captures[0].changed("fp8_linears") == 3 * 4  # the 3 traced layers; the copies come after
    assert _aten_targets(first)["aten._scaled_mm.default"] == 5 * 4  # every layer's, once replicated
    second = nanoflow_fx.optimize(build("llama", num_hidden_layers=5), config)
    assert second.nanoflow.step_fn.loaded is not None
    ref = fake_quantised_reference(build("llama", num_hidden_layers=5), fp8_modules(first))
    prompts = random_prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    for model in (first, second):
        assert close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_nanobatched_fp8_steps_equal_the_unsplit_step() -> None:
    """The activations' quantisation is per token, so a step cut into nano-batches quantises each row as the whole
    step does (the pass keeps the pieces token-parallel: `annotate` knows `_scaled_mm`)."""
    whole = nanoflow_fx.optimize(build("llama"), FP8)
    split = nanoflow_fx.optimize(build("llama"), dataclasses.replace(FP8, num_nanobatches=2))
    prompts = random_prompts()
    want = whole.nanoflow.runner.run_prompts(prompts, all_logits=True)
    got = split.nanoflow.runner.run_prompts(prompts, all_logits=True)
    assert close(got, want) <= 1e-4
    schedules = [p.last_schedule for p in program_runners(split) if p.last_schedule]
    assert schedules and len(schedules[0].split("nb").boundaries) == 3  # it ran in two nano-batches
    pieces = split.nanoflow.step_fn.program.pieces
    assert [p.name for p in pieces if p.whole] == [pieces[-1].name]  # only the LM head's piece mixes tokens


def _kernels(piece_fn: object) -> tuple[int, int]:
    """(generated kernels, extern kernel calls: the GEMMs) of an Inductor-compiled piece."""
    source = piece_fn.compiled.source_code  # type: ignore[attr-defined]
    generated = re.findall(r"^\w+ = async_compile\.(?:cpp_pybinding|triton)\(", source, re.M)
    return len(generated), source.count("extern_kernels.")


@pytest.mark.parametrize("device", DEVICES)
def test_activation_quantisation_fuses_into_the_op_before(device: str) -> None:
    """With Inductor, quantising the norms' and the SiLU-and-multiply's outputs costs no kernel: a layer's piece
    has as many kernels as without FP8, plus one: the quantisation of the attention's output (a custom op's
    output, so nothing to fuse into). The same GEMMs run (extern kernels)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    counts = {}
    for linear_dtype in ("auto", "fp8_e4m3"):
        config = dataclasses.replace(DEFAULT_CONFIG, linear_dtype=linear_dtype, inductor=True, cuda_graphs=False)
        model = nanoflow_fx.optimize(build("llama", dtype=dtype, device=device), config)
        dense = [p for p in model.nanoflow.step_fn.program.pieces if p.kind == "dense"]
        counts[linear_dtype] = _kernels(dense[1].fn)  # between the attention calls: a whole layer
    (plain, plain_gemms), (fp8, fp8_gemms) = counts["auto"], counts["fp8_e4m3"]
    assert fp8 == plain + 1 and fp8_gemms == plain_gemms


def test_full_precision_lifts_fp8_and_puts_it_back() -> None:
    """The capture check allows FP8's own effect on the eager model, which needs the eager model without FP8: within
    `Fp8Weights.full_precision()` the quantised linears compute on their original weights (the plain model's logits,
    bit for bit), linears an earlier optimize() quantised on their dequantised weights; after it, FP8 again."""
    model = build("llama")
    ids = torch.tensor([random_prompts()[0]])
    plain, names = model(ids).logits, expected_fp8(model)
    weights = quantize_linears(model, quantize=True)
    fp8 = model(ids).logits
    assert close(fp8, plain) > 1e-3
    with weights.full_precision():
        assert not fp8_modules(model) and torch.equal(model(ids).logits, plain)
    assert fp8_modules(model) == names and torch.equal(model(ids).logits, fp8)
    # a second optimize() finds FP8 linears with no full precision left: they run on their dequantised weights
    weights.commit()
    again = quantize_linears(model, quantize=True)
    assert again.quantized == again.converted == 0
    dequantised = reference("llama")
    for name in names:
        q = model.get_submodule(name)
        dequantised.get_submodule(name).weight.data = q.weight.float() * q.weight_scale
    with again.full_precision():
        assert close(model(ids).logits, dequantised(ids).logits) <= 1e-6
    assert torch.equal(model(ids).logits, fp8)


# -- a failed optimize() -----------------------------------------------------------------------------------------

def test_a_failed_optimize_restores_the_full_precision_weights() -> None:
    model = BatchMixingLlama(build("llama").config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match="with FP8 linears"):
        nanoflow_fx.optimize(model, FP8)
    assert not fp8_modules(model) and not any(hasattr(m, "weight_scale") for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.cuda
def test_a_failure_after_the_weights_left_the_gpu_brings_them_back() -> None:
    """The KV cache cannot be sized (a memory fraction too small): the full-precision weights, moved to the host
    before the sizing, come back to the GPU bit for bit."""
    model = build("llama", dtype=torch.bfloat16, device="cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nanoflow_fx.KVCacheExhaustedError):
        nanoflow_fx.optimize(model, dataclasses.replace(FP8, num_pages=None, kv_cache_memory_fraction=1e-6))
    assert not fp8_modules(model)
    after = model.state_dict()
    assert all(after[k].device.type == "cuda" and torch.equal(after[k], before[k]) for k in before)


def test_the_fp8_gemm_probe_asks_for_a_shape_scaled_mm_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fp8_gemm_error` tries one token row (the shape cuBLASLt refused with fp32 out) against a weight whose N and
    K are multiples of 16 (`torch._scaled_mm` refuses others on CUDA: a probe of N=1 called every GPU unable)."""
    from nanoflow_fx.ops import fp8

    shapes = []

    def record(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> None:
        shapes.append((tuple(x_q.shape), tuple(weight.shape)))

    monkeypatch.setattr(fp8, "scaled_linear", record)
    assert fp8.fp8_gemm_error(torch.device("cpu"), torch.bfloat16) == ""
    [(x, w)] = shapes
    assert x[0] == 1 and w[0] % 16 == 0 and w[1] % 16 == 0 and x[1] == w[1]


def test_the_scale_alignment_check_needs_no_address_while_traced() -> None:
    """`scaled_linear` copies a scale vector that does not start on 16 bytes (cuBLASLt refuses one, as on an H100:
    a row slice's); traced (fake tensors, as the step's capture runs it) there is no address, and none is asked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nanoflow_fx.ops.fp8 import _unaligned

    scales = torch.ones(8, 1)
    assert not _unaligned(scales[0:1]) and _unaligned(scales[1:2]) and not _unaligned(scales[4:5])
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(scales)[1:2]
        assert not _unaligned(fake)  # (data_ptr() would raise here)

"""FP8 linears (`NanoFlowConfig.linear_dtype="fp8_e4m3"`): the per-row quantisation, the `fp8_linears` pass (what
it replaces, and that Inductor fuses the activations' quantisation into the ops before), the engine against a torch
reference that fake-quantises the same tensors, layer replication and the saved step with it, FP8 models from
other libraries, and a failed `optimize()` that restores the full-precision weights. The accuracy on a trained
model is in tests/test_fp8_accuracy.py."""

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
from nanoflow_fx.capture.fp8_weights import Fp8Linear
from nanoflow_fx.ops.fp8 import FP8_MAX, fp8_gemm_error, quantize_rows, scaled_linear
from tests.helpers import DEFAULT_CONFIG, DEVICES, BatchMixingLlama, reference
from tests.steps import program_runners
from tests.tiny_models import VOCAB, build

FP8 = dataclasses.replace(DEFAULT_CONFIG, linear_dtype="fp8_e4m3")
_TINY = torch.finfo(torch.float32).tiny


def _fake_quant(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to e4m3 with one scale per row (amax / 448) and back, in fp32: the arithmetic FP8 linears
    promise, written here apart from the library."""
    s = (t.abs().amax(-1, keepdim=True).float() / 448).clamp(min=_TINY)
    return (t.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def _fake_quant_reference(model: torch.nn.Module, names: set[str]) -> torch.nn.Module:
    """`model` (a plain HF model) with the linears `names` fake-quantised: weights per output channel, inputs per
    token (a forward pre-hook)."""
    for name, m in model.named_modules():
        if name in names:
            m.weight.data = _fake_quant(m.weight.data).to(m.weight.dtype)
            m.register_forward_pre_hook(lambda _, args: (_fake_quant(args[0]).to(args[0].dtype), *args[1:]))
    return model


def _expected_fp8(model: torch.nn.Module) -> set[str]:
    """The linears FP8 linears quantise: every nn.Linear but the LM head (the tiny models' sizes are multiples of
    16; MoE routers and experts are not nn.Linear in transformers 5)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}


def _fp8_modules(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def _prompts(lengths: tuple[int, ...] = (9, 5, 12), seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |difference| relative to the largest logit (the capture check's fp32 measure)."""
    return ((got.float() - want.float()).abs().max() / want.abs().max().clamp(min=1.0)).item()


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
    assert (q.float().abs().amax(-1)[nonzero] == FP8_MAX).all() or (scale[nonzero] == _TINY).any()


def test_scaled_linear_is_the_dequantised_product() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(7, 48, generator=gen), torch.randn(32, 48, generator=gen), torch.randn(32, generator=gen)
    (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
    got = scaled_linear(xq, xs, wq, ws, bias, torch.float32, use_fast_accum=False)
    want = (xq.float() * xs) @ (wq.float() * ws).t() + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _close(got, x @ w.t() + bias) > 1e-3  # (and FP8 is not exact: the check above is not vacuous)


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
    assert not _fp8_modules(model)  # refused before anything changed


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
    assert _fp8_modules(model) == _expected_fp8(reference(family))
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
    assert model.nanoflow.config.linear_dtype == "auto" and not _fp8_modules(model)
    assert "fp8_linears" not in model.nanoflow.lowering.describe()
    assert _aten_targets(model)["aten._scaled_mm.default"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mixtral", "phi3"])
def test_the_engine_equals_a_fake_quantised_reference(family: str) -> None:
    """fp32 on the CPU: the FP8 step's logits are the fake-quantised model's to float rounding, and greedy
    generation gives its tokens (in these tiny models no activation lies within fp32 rounding of an e4m3 rounding
    boundary, where the two could round it apart) (qwen2: biases; gemma2: soft-capping, sliding windows; mixtral: MoE; phi3: its own
    fused Q/K/V and gate/up linears)."""
    model = nanoflow_fx.optimize(build(family), FP8)
    ref = _fake_quant_reference(reference(family), _fp8_modules(model))
    prompts = _prompts()
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert _close(got, want) <= 1e-4
    plain = torch.cat([reference(family)(torch.tensor([p])).logits[0] for p in prompts])
    assert _close(got, plain) > 1e-3  # FP8 changed the logits: the comparison above is not vacuous
    ids = torch.tensor(prompts[1:2])
    want_ids = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want_ids)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_on_cuda_with_cuda_graphs_the_engine_equals_the_fake_quantised_reference(family: str) -> None:
    """fp32 on the GPU (Inductor's pieces, `torch._scaled_mm` on the FP8 tensor cores, decode steps replayed as CUDA
    graphs): the fake-quantised reference's logits to float rounding, and its greedy tokens."""
    if fp8_gemm_error(torch.device("cuda"), torch.float32):  # (row-wise fp32 output needs cuBLAS 12.9+ on Hopper)
        pytest.skip(fp8_gemm_error(torch.device("cuda"), torch.float32))
    config = dataclasses.replace(FP8, attention_backend="triton", cuda_graphs=True)
    model = nanoflow_fx.optimize(build(family, device="cuda"), config)
    assert model.nanoflow.runner.cuda_graphs is not None
    ref = _fake_quant_reference(reference(family, device="cuda"), _fp8_modules(model))
    prompts = _prompts()
    got = model.nanoflow.runner.run_prompts(prompts, all_logits=True)
    want = torch.cat([ref(torch.tensor([p], device="cuda")).logits[0] for p in prompts])
    assert _close(got, want) <= 1e-4
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
        quantised = sum(m.weight.numel() for n, m in model.named_modules() if n in _expected_fp8(model))
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
    ref = _fake_quant_reference(build("llama", num_hidden_layers=5), _fp8_modules(first))
    prompts = _prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    for model in (first, second):
        assert _close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_nanobatched_fp8_steps_equal_the_unsplit_step() -> None:
    """The activations' quantisation is per token, so a step cut into nano-batches quantises each row as the whole
    step does (the pass keeps the pieces token-parallel: `annotate` knows `_scaled_mm`)."""
    whole = nanoflow_fx.optimize(build("llama"), FP8)
    split = nanoflow_fx.optimize(build("llama"), dataclasses.replace(FP8, num_nanobatches=2))
    prompts = _prompts()
    want = whole.nanoflow.runner.run_prompts(prompts, all_logits=True)
    got = split.nanoflow.runner.run_prompts(prompts, all_logits=True)
    assert _close(got, want) <= 1e-4
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


# -- a failed optimize() -----------------------------------------------------------------------------------------

def test_a_failed_optimize_restores_the_full_precision_weights() -> None:
    model = BatchMixingLlama(build("llama").config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nanoflow_fx.CaptureMismatchError, match="with FP8 linears"):
        nanoflow_fx.optimize(model, FP8)
    assert not _fp8_modules(model) and not any(hasattr(m, "weight_scale") for m in model.modules())
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
    assert not _fp8_modules(model)
    after = model.state_dict()
    assert all(after[k].device.type == "cuda" and torch.equal(after[k], before[k]) for k in before)


# -- FP8 models from other libraries -----------------------------------------------------------------------------

def _swap_linears(model: torch.nn.Module, make: object) -> set[str]:
    """Replace each quantisable linear of `model` by `make(linear)`; returns their names."""
    names = _expected_fp8(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, make(getattr(owner, child)))  # type: ignore[operator]
    return names


def _dequantised_reference(family: str, quantised: torch.nn.Module, names: set[str],
                           device: str = "cpu") -> torch.nn.Module:
    """The plain model with `quantised`'s FP8 weights (optimized: `Fp8Linear`s) dequantised and inputs
    fake-quantised per token."""
    ref = reference(family, device=device)
    for name in names:
        m, q = ref.get_submodule(name), quantised.get_submodule(name)
        m.weight.data = q.weight.float() * q.weight_scale  # (Fp8Linear: after optimize)
        m.register_forward_pre_hook(lambda _, args: (_fake_quant(args[0]), *args[1:]))
    return ref


def test_transformers_fbgemm_fp8_linears_are_served() -> None:
    fbgemm = pytest.importorskip("transformers.integrations.fbgemm_fp8")

    def make(lin: torch.nn.Linear) -> torch.nn.Module:
        m = fbgemm.FbgemmFp8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        q, s = quantize_rows(lin.weight.data)
        m.weight.data, m.weight_scale.data = q, s
        if lin.bias is not None:
            m.bias.data = lin.bias.data.float()
        return m

    model = build("qwen2")  # (biases on Q/K/V)
    names = _swap_linears(model, make)
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)  # linear_dtype "auto": the model's own FP8
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and _fp8_modules(model) == names
    ref = _dequantised_reference("qwen2", model, names)
    prompts = _prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert _close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_block_wise_fp8_is_refused_naming_the_limitation() -> None:
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")

    def make(lin: torch.nn.Linear) -> torch.nn.Module:
        m = finegrained.FP8Linear(lin.in_features, lin.out_features, block_size=(16, 16))
        m.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
        return m

    model = build("llama")
    _swap_linears(model, make)
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="block-wise FP8 scales.*one scale per output"):
        nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert not _fp8_modules(model)  # left as it was


@pytest.mark.cuda
def test_a_model_transformers_quantised_to_fp8_on_loading_is_served(tmp_path: Path) -> None:
    """transformers' FineGrainedFP8Config quantises a checkpoint as it loads (on a GPU): its 128x128 blocks cover
    each of the tiny model's weights whole, one scale each, which FP8 linears take."""
    import transformers as tf

    if fp8_gemm_error(torch.device("cuda"), torch.float32):
        pytest.skip(fp8_gemm_error(torch.device("cuda"), torch.float32))
    build("llama").save_pretrained(tmp_path)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=tf.FineGrainedFP8Config(),
                                                        device_map="cuda")
    except (ImportError, RuntimeError, ValueError) as e:  # transformers' own requirements for loading this way
        pytest.skip(f"transformers cannot quantise to FP8 while loading here: {e}")
    model.set_attn_implementation("eager")
    nanoflow_fx.optimize(model.eval(), DEFAULT_CONFIG)
    names = _expected_fp8(reference("llama"))
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and _fp8_modules(model) == names
    ref = _dequantised_reference("llama", model, names, device="cuda")
    prompts = _prompts()
    want = torch.cat([ref(torch.tensor([p], device="cuda")).logits[0] for p in prompts])
    assert _close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def _torchao_model(weight_only: bool) -> tuple[torch.nn.Module, set[str]]:
    torchao = pytest.importorskip("torchao.quantization")
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    # What quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())) makes on a GPU
    # (it refuses to run on the CPU): each weight a Float8Tensor with per-row scales
    act = None if weight_only else QuantizeTensorToFloat8Kwargs(granularity=torchao.PerRow())

    def make(lin: torch.nn.Linear) -> torch.nn.Linear:
        weight = torchao.Float8Tensor.from_hp(lin.weight.data, granularity=torchao.PerRow(), act_quant_kwargs=act)
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        return lin

    model = build("llama")
    return model, _swap_linears(model, make)


def test_torchao_float8_models_are_served() -> None:
    model, names = _torchao_model(weight_only=False)
    o_proj = model.model.layers[0].self_attn.o_proj.weight.qdata
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and _fp8_modules(model) == names
    assert model.model.layers[0].self_attn.o_proj.weight.data_ptr() == o_proj.data_ptr()  # converted, not copied
    ref = _dequantised_reference("llama", model, names)
    prompts = _prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert _close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_torchao_weight_only_fp8_needs_asking_for_activation_quantisation() -> None:
    model, names = _torchao_model(weight_only=True)
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="weight-only.*linear_dtype='fp8_e4m3'"):
        nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert not _fp8_modules(model)
    nanoflow_fx.optimize(model, FP8)
    assert _fp8_modules(model) == names

"""FP8 models made by other libraries are served where their tensors allow it (`capture.fp8_weights`): torchao's
float8 tensors, transformers' FBGEMM and FineGrainedFP8 linears, each converted without copying its FP8 data and
computing what its dequantised weights with per-token FP8 activations compute; block-wise scales and (unasked)
weight-only FP8 are refused, naming the limitation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.capture.fp8_weights import quantize_linears
from nanoflow_fx.ops.fp8 import fp8_gemm_error, quantize_rows
from tests.fp8_reference import FP8, close, expected_fp8, fake_quant, fp8_modules, random_prompts
from tests.helpers import DEFAULT_CONFIG, reference
from tests.tiny_models import build


def _swap_linears(model: torch.nn.Module, make: object) -> set[str]:
    """Replace each quantisable linear of `model` by `make(linear)`; returns their names."""
    names = expected_fp8(model)
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
        m.register_forward_pre_hook(lambda _, args: (fake_quant(args[0]), *args[1:]))
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
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and fp8_modules(model) == names
    ref = _dequantised_reference("qwen2", model, names)
    prompts = random_prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_full_precision_runs_converted_fp8_linears_on_their_dequantised_weights() -> None:
    """Another library's FP8 linears have no full precision: for the capture check's allowance (FP8's own effect on
    the eager model) `Fp8Weights.full_precision()` runs them on their dequantised weights, activations unquantised."""
    fbgemm = pytest.importorskip("transformers.integrations.fbgemm_fp8")

    def make(lin: torch.nn.Linear) -> torch.nn.Module:
        m = fbgemm.FbgemmFp8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        m.weight.data, m.weight_scale.data = quantize_rows(lin.weight.data)
        return m

    model = build("llama")
    names = _swap_linears(model, make)
    weights = quantize_linears(model, quantize=False)
    assert weights.converted == len(names)
    ref = reference("llama")
    for name in names:
        q = model.get_submodule(name)
        ref.get_submodule(name).weight.data = q.weight.float() * q.weight_scale
    ids = torch.tensor([random_prompts()[0]])
    fp8 = model(ids).logits
    with weights.full_precision():
        got = model(ids).logits
    assert close(got, ref(ids).logits) <= 1e-6 and close(got, fp8) > 1e-3
    assert torch.equal(model(ids).logits, fp8)


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
    assert not fp8_modules(model)  # left as it was


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
    names = expected_fp8(reference("llama"))
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and fp8_modules(model) == names
    ref = _dequantised_reference("llama", model, names, device="cuda")
    prompts = random_prompts()
    want = torch.cat([ref(torch.tensor([p], device="cuda")).logits[0] for p in prompts])
    assert close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


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
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and fp8_modules(model) == names
    assert model.model.layers[0].self_attn.o_proj.weight.data_ptr() == o_proj.data_ptr()  # converted, not copied
    ref = _dequantised_reference("llama", model, names)
    prompts = random_prompts()
    want = torch.cat([ref(torch.tensor([p])).logits[0] for p in prompts])
    assert close(model.nanoflow.runner.run_prompts(prompts, all_logits=True), want) <= 1e-4


def test_torchao_weight_only_fp8_needs_asking_for_activation_quantisation() -> None:
    model, names = _torchao_model(weight_only=True)
    with pytest.raises(nanoflow_fx.UnsupportedModelError, match="weight-only.*linear_dtype='fp8_e4m3'"):
        nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert not fp8_modules(model)
    nanoflow_fx.optimize(model, FP8)
    assert fp8_modules(model) == names


@pytest.mark.cuda
def test_a_model_torchao_quantised_on_the_gpu_is_served() -> None:
    """torchao's own `quantize_` (it runs on FP8 GPUs only): the model optimizes (its step checked against the
    eager model), every quantised linear served as an FP8 linear, and generates."""
    torchao = pytest.importorskip("torchao.quantization")
    model = build("llama", dtype=torch.bfloat16, device="cuda")
    names = expected_fp8(model)
    torchao.quantize_(model.model, torchao.Float8DynamicActivationFloat8WeightConfig(granularity=torchao.PerRow()))
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert model.nanoflow.config.linear_dtype == "fp8_e4m3" and fp8_modules(model) == names
    ids = torch.tensor(random_prompts()[:1], device="cuda")
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)

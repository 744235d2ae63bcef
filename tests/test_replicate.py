"""Layer replication (`capture.replicate`): the step traced with the first layers and copied for the others is the
step a trace of every layer gives, for every family; layers that do not repeat are traced whole; and a replicated
step that is wrong is never run."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as tf

import nanoflow_fx
from nanoflow_fx.capture import replicate
from tests.conftest import ALL_FAMILIES, DEFAULT_CONFIG
from tests.tiny_models import FAMILIES, VOCAB, build

# Layers per family: p = 1 families trace 3 and copy 2; Gemma-2 (sliding/global pairs, p = 2) traces 7 of 9
# (an odd count: the last layer is a sliding one, like the first).
_LAYERS = {family: 5 for family in FAMILIES} | {"gemma2": 9}
_PERIOD = {family: 1 for family in FAMILIES} | {"gemma2": 2}


def _deep(family: str, layers: int | None = None, **config: object) -> tf.PreTrainedModel:
    """`tests.tiny_models`' model of `family` (seed 0) with more layers."""
    return build(family, num_hidden_layers=layers or _LAYERS[family], **config)


def _step_logits(model: torch.nn.Module, lengths: list[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    return model.nanoflow.runner.run_prompts(prompts, all_logits=True)


def _layers(gm: torch.fx.GraphModule, step_fn: object) -> Counter[int | None]:
    """How many nodes Dynamo's module stack puts in each layer."""
    stack = replicate.find_layer_stack(step_fn.model, step_fn.model.nanoflow.layers)  # type: ignore[attr-defined]
    pattern = replicate._module_pattern(stack.path if stack else "model.layers")
    return Counter(replicate._stack_layer(n, pattern) for n in gm.graph.nodes if n.op == "call_function")


def _targets(gm: torch.fx.GraphModule) -> Counter[str]:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_replicated_step_is_the_fully_traced_step(family: str) -> None:
    layers, period = _LAYERS[family], _PERIOD[family]
    model = nanoflow_fx.optimize(_deep(family), DEFAULT_CONFIG)
    step_fn = model.nanoflow.step_fn
    assert step_fn.replicated is not None
    traced = step_fn.captures[0].replicated[0]
    assert step_fn.captures[0].replicated == (traced, layers, period) and traced < layers
    full = nanoflow_fx.optimize(_deep(family), dataclasses.replace(DEFAULT_CONFIG, replicate_layers=False))
    assert full.nanoflow.step_fn.replicated is None
    # The same ops, as many of each: every layer is in the graph (an 8-layer model has 8 attention calls), each
    # copied node labelled with the layer it runs in ...
    assert _targets(step_fn.graphs[0]) == _targets(full.nanoflow.step_fn.graphs[0])
    assert _layers(step_fn.graphs[0], step_fn) == _layers(full.nanoflow.step_fn.graphs[0], step_fn)
    # ... each reading its own weights and cache, in the same order: the same numbers, bit for bit.
    for lengths in ([5, 1, 8], [1, 1], [3, 2, 2, 1]):
        assert torch.equal(_step_logits(model, lengths), _step_logits(full, lengths))
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    want = _deep(family).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert len(step_fn.graphs) == 1  # every step ran the replicated graph: Dynamo never traced again
    assert "compile_replicate_s" in model.nanoflow.timings


def test_replicated_layers_share_the_inductor_pieces_and_nano_batches_split_them() -> None:
    """With Inductor the copied layers' pieces are the traced ones' (3 compiles for any depth), and a nano-batched
    program lowered from a replicated graph generates like HF."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    want = _deep("llama", 6).generate(ids, max_new_tokens=5, do_sample=False)
    model = nanoflow_fx.optimize(_deep("llama", 6), dataclasses.replace(DEFAULT_CONFIG, inductor=True))
    capture = model.nanoflow.step_fn.captures[0]
    assert capture.replicated == (3, 6, 1)
    assert sum(p.kind == "dense" for p in capture.program.pieces) == 7 and capture.program.compiles == 3
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
    split = nanoflow_fx.optimize(_deep("llama", 6), dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    assert split.nanoflow.step_fn.replicated is not None
    assert torch.equal(split.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_layers_that_differ_are_traced_whole() -> None:
    """A layer whose attribute differs (here one attention's scaling), or layers with no period (Qwen-2's first
    layers global, the rest sliding), break the repetition: every layer is traced, and the step is right."""
    model = _deep("llama", 5)
    model.model.layers[3].self_attn.scaling *= 2  # a copy of another layer would compute this layer wrongly
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    nanoflow_fx.optimize(model, DEFAULT_CONFIG)
    assert model.nanoflow.step_fn.replicated is None
    assert "nanoflow_replicated" not in model.nanoflow.step_fn.graphs[0].meta
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
    qwen = _deep("qwen2", 6, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert replicate.find_layer_stack(qwen, nanoflow_fx.optimize(qwen, DEFAULT_CONFIG).nanoflow.layers) is None
    assert qwen.nanoflow.step_fn.replicated is None
    with torch.no_grad():
        reference = _deep("qwen2", 6, use_sliding_window=True, sliding_window=3, max_window_layers=2)
        assert torch.equal(qwen.generate(ids, max_new_tokens=4, do_sample=False),
                           reference.generate(ids, max_new_tokens=4, do_sample=False))


def test_alike_layers_replicate_whatever_objects_they_hold(caplog: pytest.LogCaptureFixture) -> None:
    """Modules held as plain attributes, one object per layer (transformers 5.25 gives every attention its own
    kernel-function wrapper in `_kernel_funcs`), are compared by value: equal ones do not stop replication. One
    whose value differs does, with a warning that names it (not a silent INFO-level fallback)."""

    class Helper(torch.nn.Module):  # a parameter-free module, as the kernel wrappers are
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

    model = _deep("llama", 5)
    for layer in model.model.layers:
        layer.self_attn.__dict__["helpers"] = {"rotary": Helper(1.0)}  # a plain attribute, not a submodule
    with caplog.at_level(logging.INFO, logger="nanoflow_fx.capture.replicate"):
        stack = replicate.find_layer_stack(model, nanoflow_fx.optimize(model, DEFAULT_CONFIG).nanoflow.layers)
    assert stack is not None and stack.period == 1 and model.nanoflow.step_fn.replicated is not None
    assert not _records(caplog)

    model.model.layers[3].self_attn.__dict__["helpers"]["rotary"].factor = 2.0
    with caplog.at_level(logging.INFO, logger="nanoflow_fx.capture.replicate"):
        assert replicate.find_layer_stack(model, model.nanoflow.layers) is None
    warning = [r for r in _records(caplog) if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "layers 0 and 3" in warning[0].getMessage()
    assert "`self_attn.helpers`" in warning[0].getMessage()


def test_layers_without_a_period_are_traced_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Layers whose attention differs with no period (Qwen-2's first layers global, the rest sliding) are a model
    that cannot replicate: INFO, not a warning."""
    qwen = _deep("qwen2", 6, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    layers = nanoflow_fx.optimize(qwen, DEFAULT_CONFIG).nanoflow.layers
    with caplog.at_level(logging.INFO, logger="nanoflow_fx.capture.replicate"):
        assert replicate.find_layer_stack(qwen, layers) is None
    assert [r.levelno for r in _records(caplog)] == [logging.INFO]


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The replication's own log records (other loggers may log at any level, whatever ran before)."""
    return [r for r in caplog.records if r.name == replicate.__name__]


def test_a_failed_replication_traces_every_layer(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise replicate.NotReplicable("refused by the test")

    monkeypatch.setattr(replicate, "expand", refuse)
    with caplog.at_level(logging.INFO, logger="nanoflow_fx"):
        model = nanoflow_fx.optimize(_deep("llama"), DEFAULT_CONFIG)
    assert "refused by the test" in caplog.text
    assert model.nanoflow.step_fn.replicated is None and len(model.nanoflow.step_fn.graphs) == 1
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       _deep("llama").generate(ids, max_new_tokens=4, do_sample=False))


def test_a_wrong_replicated_step_fails_the_check_and_is_traced_again(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Were the copies to read the wrong layer's weights (here: two copied layers' inputs swapped), the probe
    check against the eager model catches it, and the step is traced whole."""
    real = replicate.expand

    def swapped(*args: object, **kwargs: object) -> object:
        added, templates, values = real(*args, **kwargs)
        half = len(added) // 2  # layer 3's inputs <-> layer 4's (each copy adds the same inputs, in order)
        return added[half:] + added[:half], templates, values[half:] + values[:half]

    monkeypatch.setattr(replicate, "expand", swapped)
    with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
        model = nanoflow_fx.optimize(_deep("llama"), DEFAULT_CONFIG)
    assert "failed the check" in caplog.text and "replicated" in caplog.text
    step_fn = model.nanoflow.step_fn
    assert step_fn.replicated is None and len(step_fn.graphs) == 1
    assert "nanoflow_replicated" not in step_fn.graphs[0].meta
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       _deep("llama").generate(ids, max_new_tokens=4, do_sample=False))


def test_a_replicated_step_is_saved_and_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOFLOW_FX_SAVE_STEP", raising=False)
    config = dataclasses.replace(DEFAULT_CONFIG, cache_dir=str(tmp_path), inductor=True)
    traced = nanoflow_fx.optimize(_deep("qwen3"), config)
    assert traced.nanoflow.step_fn.replicated is not None
    loaded = nanoflow_fx.optimize(_deep("qwen3"), config)
    assert loaded.nanoflow.step_fn.loaded is not None and loaded.nanoflow.step_fn.graphs == []
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    want = _deep("qwen3").generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), want)


def _cuda_deep(family: str, dtype: torch.dtype) -> tf.PreTrainedModel:
    """test_gpu_backends' shapes (FlashInfer's head_dim 64) with 9 layers: Llama (p = 1) or Gemma-2 (p = 2)."""
    from tests.test_gpu_backends import _COMMON

    common = {**_COMMON, "num_hidden_layers": 9}
    torch.manual_seed(0)
    if family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, sliding_window=24, attn_logit_softcapping=20.0,
                                                     final_logit_softcapping=30.0, query_pre_attn_scalar=64))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    return model.to(device="cuda", dtype=dtype).eval()


@pytest.mark.cuda
@pytest.mark.parametrize(("family", "backend"),
                         [("gemma2", "flashinfer"), ("llama", "flashinfer"), ("llama", "triton")])
def test_the_replicated_step_on_cuda_is_the_fully_traced_step(family: str, backend: str) -> None:
    """FlashInfer (bf16) or Triton (fp32) attention, Inductor pieces, CUDA graphs captured on the replicated step:
    the same logits as the step traced over every layer, bit for bit, and the same generation."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    dtype = torch.bfloat16 if backend == "flashinfer" else torch.float32
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=8, max_seq_len=128, page_size=16, num_pages=128,
                                        attention_backend=backend, inductor=True, interim_attention=False)
    model = nanoflow_fx.optimize(_cuda_deep(family, dtype), config)
    full = nanoflow_fx.optimize(_cuda_deep(family, dtype), dataclasses.replace(config, replicate_layers=False))
    assert model.nanoflow.step_fn.replicated is not None and full.nanoflow.step_fn.replicated is None
    assert model.nanoflow.runner.cuda_graphs is not None
    prompts = [[5, 6, 7, 8, 9] * 6, [10, 11, 12]]
    assert torch.equal(model.nanoflow.runner.run_prompts(prompts, all_logits=True),
                       full.nanoflow.runner.run_prompts(prompts, all_logits=True))
    ids = torch.randint(3, 500, (3, 30), generator=torch.Generator().manual_seed(8)).cuda()
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False),
                       full.generate(ids, max_new_tokens=12, do_sample=False))


def test_a_hook_that_differs_per_layer_keeps_every_layer_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward hooks are part of what a layer computes. One bound to its layer (here a partial scaling layer i's
    output by 1 + i/10) makes the layers' signatures differ, so none is copied; and were the signatures blind to
    it, the traced layers' graphs differ (the factor is a constant in each), so the node-for-node check refuses
    to copy them. Either way the hooks' effect is in the step."""
    import functools

    def scale(factor: float, module: torch.nn.Module, args: object, output: object) -> object:
        return (output[0] * factor, *output[1:]) if isinstance(output, tuple) else output * factor

    def hooked() -> tf.PreTrainedModel:
        model = _deep("llama", 5)
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(functools.partial(scale, 1 + i / 10))
        return model

    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = hooked().generate(ids, max_new_tokens=4, do_sample=False)
    model = nanoflow_fx.optimize(hooked(), DEFAULT_CONFIG)
    assert replicate.find_layer_stack(model, model.nanoflow.layers) is None
    assert model.nanoflow.step_fn.replicated is None
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)

    monkeypatch.setattr(replicate, "_attributes", lambda *args: [])  # the signatures miss the hooks
    model = nanoflow_fx.optimize(hooked(), DEFAULT_CONFIG)
    assert replicate.find_layer_stack(model, model.nanoflow.layers) is not None
    assert model.nanoflow.step_fn.replicated is None  # refused by the node-for-node check
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)

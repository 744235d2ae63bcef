"""Saved steps (`capture.store`): a second process (here: a second model of the same weights) loads the captured
and lowered step instead of tracing it, runs it exactly as the traced step, and never runs a wrong one."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.capture.inductor import SavedPiece
from nanoflow_fx.capture.store import LoadedStep
from tests.conftest import DEFAULT_CONFIG, reference
from tests.tiny_models import VOCAB, build


@pytest.fixture(autouse=True)
def _saving_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOFLOW_FX_SAVE_STEP", raising=False)  # conftest turns it off for the other tests


def _config(tmp_path: Path, **changes: object) -> nanoflow_fx.NanoFlowConfig:
    return dataclasses.replace(DEFAULT_CONFIG, cache_dir=str(tmp_path), **changes)


def _prompts() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))


def _saved(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "steps").glob("*.pt"))


@pytest.mark.parametrize(("family", "inductor"), [("llama", False), ("gemma2", False), ("qwen2", True)])
def test_a_saved_step_is_loaded_and_runs_as_the_traced_one(tmp_path: Path, family: str, inductor: bool) -> None:
    config = _config(tmp_path, inductor=inductor)
    traced = nanoflow_fx.optimize(build(family), config)
    assert traced.nanoflow.step_fn.loaded is None and len(_saved(tmp_path)) == 1
    loaded = nanoflow_fx.optimize(build(family), config)
    step_fn = loaded.nanoflow.step_fn
    assert step_fn.loaded is not None and step_fn.graphs == []  # no Dynamo trace at all
    assert "compile_load_s" in loaded.nanoflow.timings and "compile_dynamo_s" not in loaded.nanoflow.timings
    ids = _prompts()
    want = reference(family).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(traced.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert step_fn.graphs == []  # every step of the generation ran the loaded step
    (path,) = _saved(tmp_path)
    saved = torch.load(path, weights_only=False)["step"]
    dense = [p for p in saved.program.pieces if p.kind == "dense"]
    assert dense and all(isinstance(p.fn, int) for p in dense)  # each piece points into `pieces`
    if inductor:  # the file holds each distinct piece's generated code once (Inductor's module source)
        assert all(isinstance(p, SavedPiece) for p in saved.pieces)
        assert len(saved.pieces) == len({p.fn for p in dense})
        assert all(isinstance(p.fn, type(lambda: 0)) for p in step_fn.program.pieces if p.kind == "dense")
    else:  # each dense piece as FX code
        assert all(isinstance(p, torch.fx.GraphModule) for p in saved.pieces) and len(saved.pieces) == len(dense)


def test_identical_layers_are_saved_as_one_piece(tmp_path: Path) -> None:
    """Identical layers share one compiled piece: the file holds its code once, and every piece of those layers
    points to it (pickling Inductor's compiled object itself would fail on CUDA)."""
    import transformers as tf

    def four_layers() -> torch.nn.Module:
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=128)).eval()

    config = _config(tmp_path, inductor=True)
    traced = nanoflow_fx.optimize(four_layers(), config)
    (path,) = _saved(tmp_path)
    saved = torch.load(path, weights_only=False)["step"]
    dense = [p.fn for p in saved.program.pieces if p.kind == "dense"]
    assert len(dense) == 5 and len(saved.pieces) == len(set(dense)) == 3  # first, middle (x3: shared), last
    loaded = nanoflow_fx.optimize(four_layers(), config)
    assert loaded.nanoflow.step_fn.loaded is not None
    fns = [p.fn for p in loaded.nanoflow.step_fn.program.pieces if p.kind == "dense"]
    assert len({id(fn) for fn in fns}) == 3  # loaded once per distinct piece
    ids = _prompts()
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False),
                       traced.generate(ids, max_new_tokens=5, do_sample=False))


def test_the_key_follows_what_the_graph_depends_on(tmp_path: Path) -> None:
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert nanoflow_fx.optimize(build("llama"), _config(tmp_path)).nanoflow.step_fn.loaded is not None
    # budgets are not in the graph (its sizes are symbolic): "auto" budgets measured differently still load
    budgets = _config(tmp_path, max_num_tokens=256, max_batch_size=4, max_seq_len=64)
    assert nanoflow_fx.optimize(build("llama"), budgets).nanoflow.step_fn.loaded is not None
    for model, config in [(build("llama"), _config(tmp_path, page_size=8)),  # the cache's shape
                          (build("llama"), _config(tmp_path, fuse_linears=False)),  # the parameter layout
                          (build("llama").double(), _config(tmp_path))]:  # the dtype

        assert nanoflow_fx.optimize(model, config).nanoflow.step_fn.loaded is None
    assert len(_saved(tmp_path)) == 4


def test_a_loaded_step_reads_the_parameters_of_each_call(tmp_path: Path) -> None:
    """Parameters replaced after optimize() (load_state_dict(assign=True)) are what the loaded step computes with."""
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    model = nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert model.nanoflow.step_fn.loaded is not None
    other = build("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict(), assign=True)
    ids = _prompts()
    want = other.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_an_unreadable_file_is_traced_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    (path,) = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[: 200])  # truncated
    with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
        model = nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert "could not load the saved step" in caplog.text
    assert model.nanoflow.step_fn.loaded is None and model.nanoflow.step_fn.graphs
    assert path.stat().st_size > 200  # saved again by the new trace
    assert nanoflow_fx.optimize(build("llama"), _config(tmp_path)).nanoflow.step_fn.loaded is not None


def test_a_loaded_step_that_fails_the_check_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    right = LoadedStep.__call__
    monkeypatch.setattr(LoadedStep, "__call__", lambda self, *a: right(self, *a) * 2)  # a step gone wrong
    with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
        model = nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert "failed the check" in caplog.text
    assert model.nanoflow.step_fn.loaded is None and model.nanoflow.step_fn.graphs  # traced instead
    ids = _prompts()
    want = reference("llama").generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)


def test_saving_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nanoflow_fx.optimize(build("llama"), _config(tmp_path, save_step=False))
    monkeypatch.setenv("NANOFLOW_FX_SAVE_STEP", "0")
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert _saved(tmp_path) == []


@pytest.mark.parametrize("count", [2, "auto"])
def test_one_saved_step_serves_every_nano_batch_count(tmp_path: Path, count: object) -> None:
    """The nano-batch count is a cut chosen per step at run time, not part of the lowering: a step saved by a
    whole-step configuration is loaded by a nano-batched one (and "auto"), which cuts it and generates like HF."""
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    model = nanoflow_fx.optimize(build("llama"), _config(tmp_path, num_nanobatches=count))
    step_fn = model.nanoflow.step_fn
    assert step_fn.loaded is not None and step_fn.graphs == [] and len(_saved(tmp_path)) == 1
    ids = _prompts()
    want = reference("llama").generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
    assert step_fn.graphs == []
    if count == 2:  # the prefill step was cut into 2 nano-batches by the loaded program
        schedule = step_fn.loaded.graph.last_schedule
        assert schedule is not None and schedule.split("nb").num_nanobatches == 2


def test_explain_shows_a_loaded_step_without_tracing_it(tmp_path: Path) -> None:
    nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    model = nanoflow_fx.optimize(build("llama"), _config(tmp_path))
    assert model.nanoflow.step_fn.graphs == []
    e = nanoflow_fx.explain(model)
    assert e.source.startswith("loaded from the saved step") and "L1.attn" in str(e)
    assert model.nanoflow.step_fn.graphs == [] and model.nanoflow.step_fn.loaded is not None


def test_the_step_is_traced_while_the_attention_backend_prepares(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize() traces the step without running it while the backend readies its kernels (FlashInfer's JIT
    build), then waits for them before the first real step; the probe reuses the trace."""
    from nanoflow_fx.model_runtime import NanoFlowRuntime
    from nanoflow_fx.ops import backend as attention_backends

    runtimes: list[NanoFlowRuntime] = []
    seen: list[tuple[int, int]] = []
    real_init = NanoFlowRuntime.__init__

    def init(self: NanoFlowRuntime, *args: object) -> None:
        real_init(self, *args)
        runtimes.append(self)

    class Preparing:  # a preparation that is never done by itself: optimize() must wait for it
        seconds = failure = None

        def done(self) -> bool:
            return False

        def wait(self) -> None:
            seen.append((len(runtimes[0].step_fn.graphs), runtimes[0].runner.stats["eager_steps"]))

    def prepare(*args: object) -> object:
        return Preparing()

    monkeypatch.setenv("NANOFLOW_FX_SAVE_STEP", "0")
    monkeypatch.setattr(NanoFlowRuntime, "__init__", init)
    monkeypatch.setattr(attention_backends.get("torch"), "prepare", prepare, raising=False)
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    assert seen == [(1, 0)]  # traced, nothing run yet
    assert len(model.nanoflow.step_fn.graphs) == 1 and model.nanoflow.runner.stats["eager_steps"] == 1  # the probe


def _cuda_model(backend: str) -> torch.nn.Module:
    """FlashInfer: a bf16 model of head_dim 64 (its kernels' sizes); Triton: the fp32 tiny model."""
    if backend == "flashinfer":
        from tests.test_gpu_backends import CONFIGS

        torch.manual_seed(0)
        return CONFIGS["llama"]().to(device="cuda", dtype=torch.bfloat16).eval()
    return build("llama", device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_a_loaded_step_on_cuda_computes_what_the_traced_one_does(tmp_path: Path, backend: str) -> None:
    """Inductor pieces reloaded from their generated code, CUDA graphs captured on the loaded step."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    config = _config(tmp_path, attention_backend=backend, inductor=True, interim_attention=False)
    traced = nanoflow_fx.optimize(_cuda_model(backend), config)
    loaded = nanoflow_fx.optimize(_cuda_model(backend), config)
    assert loaded.nanoflow.step_fn.loaded is not None and loaded.nanoflow.step_fn.graphs == []
    assert loaded.nanoflow.runner.cuda_graphs is not None
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    want = traced.nanoflow.runner.run_prompts(prompts, all_logits=True)
    got = loaded.nanoflow.runner.run_prompts(prompts, all_logits=True)
    # The same kernel code on the same inputs, but not always the same launch configuration: Inductor benchmarks
    # each kernel's candidate configs (block sizes, warps) at its first run in a process, and the loaded step's
    # kernels are benchmarked again. With an empty Inductor cache the two chose differently for 3-5 of 8 kernels
    # in each of 3 runs (H200, 2026-11-27; RMSNorm's persistent reduction among them), so fp32 logits differed
    # by up to 4.5e-8 (a reduction order). Hence: within a few roundings, and the same tokens below.
    bound = (1e-6 if got.dtype == torch.float32 else 2**-7) * want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= bound, f"max |loaded - traced| = {diff:.3g} > {bound:.3g}"
    ids = _prompts().cuda()
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False),
                       traced.generate(ids, max_new_tokens=6, do_sample=False))

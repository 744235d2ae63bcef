"""Interim attention (`NanoFlowConfig.interim_attention`): while the chosen backend's kernels are still being built,
the first steps run on a stand-in backend's kernel, and the runtime switches at the first step after the build.

On the CPU the chosen backend is a stand-in for FlashInfer (`GatedBackend`): it plans on the host, its
preparation finishes only when the test opens a gate, and it counts the attention calls it runs; the interim
kernel is the torch reference. Generation must equal HF's before, across and after the switch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.context import StepContext, current, step_context
from nanoflow_fx.ops import backend as attention_backends
from nanoflow_fx.ops.backend import AttentionBackend, Preparation
from tests.conftest import DEFAULT_CONFIG, reference
from tests.tiny_models import VOCAB, build

NUM_LAYERS = 2  # the tiny models' attention layers


class _Planner:
    def __init__(self, backend: GatedBackend) -> None:
        self.backend = backend

    def plan(self, host: Any, kv_indices: torch.Tensor) -> dict[str, int]:
        self.backend.planned_steps += 1
        return {"planned_in": threading.get_ident()}  # what the step context carries to `run`

    def plan_tables(self, *tables: torch.Tensor) -> _Planner:  # a nano-batch's plan
        return self


class GatedBackend(AttentionBackend):
    """FlashInfer's shape on the CPU: plans every step on the host, readies its kernels in the background (until
    `gate` opens), runs the reference kernel (or a wrong one, `wrong`) only on a plan: the one the step context
    carries (made in this thread), or a nano-batch's own."""

    name = "gated_test"
    plans_on_host = True
    interim = "torch"

    def __init__(self, build_fails: bool = False, wrong: bool = False) -> None:
        self.gate = threading.Event()
        self.build_fails, self.wrong = build_fails, wrong
        self.calls = self.planned_steps = self.nanobatch_calls = 0
        self.preparation: Preparation | None = None

    def make_planner(self, *args: Any, **kwargs: Any) -> _Planner:
        return _Planner(self)

    def prepare(self, *args: Any) -> Preparation:
        def build() -> None:
            self.gate.wait()
            if self.build_fails:
                raise RuntimeError("nvcc failed (stand-in)")

        self.preparation = Preparation(build, self.name)
        return self.preparation

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, *args: Any) -> torch.Tensor:
        plans = current().plans or {}
        if not self._ready() or plans.get("planned_in") != threading.get_ident():
            raise RuntimeError("the gated backend ran before its kernels were ready or without a plan")
        self.calls += 1
        out = attention_backends.get("torch").run(q, kv_cache, *args)
        return torch.zeros_like(out) if self.wrong else out

    def run_planned(self, plan: Any, config: Any, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Any,
                    decode: Any = None, kv_scale: Any = None) -> torch.Tensor:
        if not self._ready() or not isinstance(plan, _Planner):
            raise RuntimeError("the gated backend ran a nano-batch before its kernels were ready or without a plan")
        self.nanobatch_calls += 1
        return attention_backends.get("torch").run(q, kv_cache, *metadata, config.scaling, config.sliding_window,
                                                   config.softcap)

    def _ready(self) -> bool:
        return self.preparation is not None and self.preparation.done()


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedBackend]:
    backend = GatedBackend()
    monkeypatch.setitem(attention_backends._REGISTRY, backend.name, backend)
    monkeypatch.setattr(attention_backends, "choose", lambda *args: backend)
    yield backend
    backend.gate.set()  # (a failed test must not leave the thread waiting)


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))


def _hf(ids: torch.Tensor, new: int) -> torch.Tensor:
    return reference("llama").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                       do_sample=False)


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def test_the_first_steps_run_on_the_interim_kernel_then_on_the_backend(gated: GatedBackend) -> None:
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    runtime = model.nanoflow
    assert runtime.runner.interim is attention_backends.get("torch")
    assert runtime.timings["attention_interim"] == 1.0 and runtime.probe is not None
    assert gated.calls == 0 and gated.planned_steps == 0  # the probe ran on the interim kernel

    ids = _ids()
    want = _hf(ids, 6)
    assert torch.equal(_generate(model, ids, 6), want)
    assert gated.calls == 0 and runtime.runner.stats["interim_steps"] >= 6

    gated.gate.set()
    runtime.attention_ready.wait()
    interim_steps = runtime.runner.stats["interim_steps"]
    assert torch.equal(_generate(model, ids, 6), want)
    assert runtime.runner.interim is None and runtime.probe is None  # (the switch's check used the probe)
    assert runtime.runner.stats["interim_steps"] == interim_steps  # no interim step after the build
    # the switch's check (one probe step) and the 6 generation steps, every layer on the backend
    assert gated.planned_steps == 7 and gated.calls == 7 * NUM_LAYERS
    assert runtime.timings["attention_switch_s"] > 0 and runtime.timings["attention_switch_cost_s"] > 0


def test_the_switch_happens_in_the_middle_of_a_generation(gated: GatedBackend) -> None:
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    runner = model.nanoflow.runner
    real_run = runner.run
    steps: list[bool] = []

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        steps.append(runner.interim is None)
        if len(steps) == 3:
            gated.gate.set()
            model.nanoflow.attention_ready.wait()
        return real_run(*args, **kwargs)

    runner.run = run  # type: ignore[method-assign]
    ids = _ids()
    interim_steps = runner.stats["interim_steps"]
    assert torch.equal(_generate(model, ids, 8), _hf(ids, 8))
    # steps 1-2 interim; the 3rd switches before it runs (the switch's check is one more step through run())
    assert steps == [False] * 3 + [True] * 6 and runner.interim is None  # 8 steps and the check
    assert runner.stats["interim_steps"] == interim_steps + 2 and gated.calls == 7 * NUM_LAYERS


@pytest.mark.parametrize("failure", ["build", "check"])
def test_a_backend_that_fails_keeps_the_interim_kernel(monkeypatch: pytest.MonkeyPatch, gated: GatedBackend,
                                                        caplog: pytest.LogCaptureFixture, failure: str) -> None:
    """A failed build, or a backend whose step disagrees with the eager model, is never switched to: steps stay on
    the (checked) interim kernel, with a warning that says why."""
    gated.build_fails, gated.wrong = failure == "build", failure == "check"
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    gated.gate.set()
    model.nanoflow.attention_ready.wait()
    ids = _ids()
    with caplog.at_level(logging.WARNING, logger="nanoflow_fx"):
        assert torch.equal(_generate(model, ids, 5), _hf(ids, 5))
    reason = "could not be built" if failure == "build" else "failed the check against the eager model"
    assert any("attention stays off" in r.message and reason in r.message for r in caplog.records)
    assert model.nanoflow.runner.interim is attention_backends.get("torch")
    assert gated.calls == (NUM_LAYERS if failure == "check" else 0)  # only the switch's check ran on it
    steps = model.nanoflow.runner.stats["interim_steps"]
    assert torch.equal(_generate(model, ids, 5), _hf(ids, 5))
    assert model.nanoflow.runner.stats["interim_steps"] == steps + 5 and gated.calls <= NUM_LAYERS  # no retry


def test_interim_attention_off_waits_for_the_build(gated: GatedBackend) -> None:
    timer = threading.Timer(0.3, gated.gate.set)
    timer.start()
    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(DEFAULT_CONFIG, interim_attention=False))
    assert model.nanoflow.runner.interim is None and model.nanoflow.timings["attention_interim"] == 0.0
    assert gated.calls == NUM_LAYERS  # the probe ran on the backend
    ids = _ids()
    assert torch.equal(_generate(model, ids, 4), _hf(ids, 4))
    assert model.nanoflow.runner.stats["interim_steps"] == 0


def test_a_backend_ready_by_the_end_of_the_trace_is_used_at_once(gated: GatedBackend) -> None:
    gated.gate.set()
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    assert model.nanoflow.runner.interim is None and gated.calls == NUM_LAYERS


def test_nano_batched_configurations_start_on_the_interim_kernel_too(gated: GatedBackend) -> None:
    """Nano-batched steps plan each nano-batch on the backend, so until its kernels are built steps run whole on the
    interim kernel; after the switch they are cut (each nano-batch on its own plan). HF's tokens throughout."""
    model = nanoflow_fx.optimize(build("llama"), dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    assert model.nanoflow.runner.interim is not None and model.nanoflow.timings["attention_interim"] == 1.0
    ids, steps = _ids(), model.nanoflow.runner.stats["interim_steps"]
    assert torch.equal(_generate(model, ids, 3), _hf(ids, 3))
    assert gated.calls == gated.nanobatch_calls == 0 and model.nanoflow.runner.stats["interim_steps"] == steps + 3
    gated.gate.set()
    assert model.nanoflow.wait_until_ready()
    assert torch.equal(_generate(model, ids, 4), _hf(ids, 4))
    assert gated.nanobatch_calls > 0  # the prefill step was cut: its attention ran per nano-batch on the backend


def test_a_step_context_holds_on_its_own_thread_only() -> None:
    torch_backend = attention_backends.get("torch")
    stand_in = AttentionBackend()
    seen: list[AttentionBackend] = []
    with step_context(StepContext(substitute=stand_in)):
        assert attention_backends.resolve("torch") is stand_in
        other = threading.Thread(target=lambda: seen.append(attention_backends.resolve("torch")))
        other.start()
        other.join()
    assert seen == [torch_backend] and attention_backends.resolve("torch") is torch_backend
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_backends.resolve("no_such_backend")


def test_an_interim_backend_must_not_plan_on_the_host(gated: GatedBackend) -> None:
    gated.gate.set()
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    with pytest.raises(ValueError, match="must not plan on the host"):
        model.nanoflow.runner.run_interim(gated, lambda: True, lambda runner: True)


@pytest.mark.cuda
def test_flashinfer_steps_run_on_triton_until_its_build_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pair on the GPU (bf16): FlashInfer's preparation held back by a gate, the first generation on
    Triton's kernel (eager steps, no CUDA graphs), then the switch: FlashInfer's step checked, CUDA graphs
    captured and replayed. Every token a greedy choice of the eager model within bf16 tolerance."""
    pytest.importorskip("flashinfer")
    from nanoflow_fx.ops.flashinfer_attention import FlashInferBackend
    from tests.test_gpu_backends import CONFIGS, _greedy_within_tolerance

    gate = threading.Event()
    real_prepare = FlashInferBackend.prepare

    def prepare(self: FlashInferBackend, *args: Any) -> Preparation:
        real = real_prepare(self, *args)

        def build() -> None:
            real.wait()
            gate.wait()
            if real.failure is not None:
                raise real.failure

        return Preparation(build, "flashinfer")

    monkeypatch.setattr(FlashInferBackend, "prepare", prepare)
    torch.manual_seed(0)
    model = CONFIGS["llama"]().to(device="cuda", dtype=torch.bfloat16).eval()
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=16, max_seq_len=160, page_size=16, max_num_tokens=256,
                                        num_pages=256, inductor=True)
    try:
        fast = nanoflow_fx.optimize(model, config)
        runner = fast.nanoflow.runner
        assert fast.nanoflow.attention_backend.name == "flashinfer" and runner.interim is not None
        assert runner.interim.name == "triton" and runner.cuda_graphs is None
        ids = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(3)).cuda()
        before = fast.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert runner.stats["interim_steps"] >= 8 and runner.stats["graph_steps"] == 0
    finally:
        gate.set()
    fast.nanoflow.attention_ready.wait()
    after = fast.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    runner = fast.nanoflow.runner
    assert runner.interim is None and runner.cuda_graphs is not None, runner.cuda_graphs_off_reason
    assert runner.stats["graph_steps"] >= 7  # decode steps replayed FlashInfer graphs
    for out in (before, after):
        for prompt, row in zip(ids.tolist(), out.tolist()):
            assert _greedy_within_tolerance(fast, prompt, row[len(prompt):])


def test_the_flashinfer_build_thread_yields_the_cpu_to_the_step_compilation() -> None:
    """The build thread lowers its own priority (and so its compiler processes'); the rest of the process keeps
    its own."""
    import os
    import subprocess
    import sys

    from nanoflow_fx.ops.flashinfer_attention import _lower_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread niceness is Linux's")
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []

    def build() -> None:
        _lower_priority()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                               capture_output=True, text=True, check=True)
        seen.append(int(child.stdout))

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert seen == [min(before + 10, 19)] and os.getpriority(os.PRIO_PROCESS, 0) == before


def test_a_switch_without_free_pages_for_its_check_is_tried_again(gated: GatedBackend) -> None:
    """The switch's check takes a few KV pages; when the engine holds them all, the step runs on the interim
    kernel and the switch is tried again at the next step."""
    from nanoflow_fx.errors import KVCacheExhaustedError

    gated.gate.set()
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    runner = model.nanoflow.runner
    attempts: list[int] = []

    def switch(r: object) -> bool:
        attempts.append(runner.stats["interim_steps"])
        if len(attempts) == 1:
            raise KVCacheExhaustedError("no pages for the check (stand-in)")
        return True

    runner.run_interim(attention_backends.get("torch"), lambda: True, switch)
    steps = runner.stats["interim_steps"]
    runner.run_prompts([[5, 6, 7]])
    assert runner.interim is not None and runner.stats["interim_steps"] == steps + 1
    runner.run_prompts([[5, 6, 7]])
    assert runner.interim is None and attempts == [steps, steps + 1] and runner.stats["interim_steps"] == steps + 1


def test_wait_until_ready_switches_at_once(gated: GatedBackend) -> None:
    model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
    assert model.nanoflow.runner.interim is not None
    gated.gate.set()
    assert model.nanoflow.wait_until_ready() is True
    assert model.nanoflow.runner.interim is None and gated.planned_steps == 1  # the switch's check, no step yet
    ids = _ids()
    assert torch.equal(_generate(model, ids, 3), _hf(ids, 3))


def test_a_dropped_model_on_the_interim_kernel_is_freed_at_once(gated: GatedBackend) -> None:
    """The runner keeps the switch to the backend (which checks the backend's step on the model): that must not
    keep the runtime or the model alive once the model is dropped, before or after the switch."""
    import gc
    import weakref

    for switched in (False, True):
        model = nanoflow_fx.optimize(build("llama"), DEFAULT_CONFIG)
        assert model.nanoflow.runner.interim is not None
        _generate(model, _ids(), 2)
        if switched:
            gated.gate.set()
            model.nanoflow.wait_until_ready()
            assert model.nanoflow.runner.interim is None
        kv, weights = weakref.ref(model.nanoflow.kv_cache), weakref.ref(model.lm_head.weight)
        gc.collect()
        gc.disable()
        try:
            del model
            assert kv() is None and weights() is None, f"switched={switched}"
        finally:
            gc.enable()


def test_an_fp8_cache_runs_on_the_interim_kernel_and_then_on_the_backend(gated: GatedBackend) -> None:
    """An FP8 KV cache with calibrated scales: the interim kernel's steps and the backend's after the switch (whose
    check compares against the eager model over fake-quantised K/V) both generate what HF's eager model does
    attending over K/V fake-quantised with the same scales."""
    from tests.reference import fp8_kv_attention

    config = dataclasses.replace(DEFAULT_CONFIG, kv_cache_dtype="fp8_e4m3", calibrate_kv_scales=True)
    model = nanoflow_fx.optimize(build("llama"), config)
    runtime = model.nanoflow
    assert runtime.runner.interim is attention_backends.get("torch")
    assert runtime.kv_cache.dtype == torch.float8_e4m3fn and runtime.kv_cache.scale_values != [(1.0, 1.0)] * 2
    ids = _ids()
    with fp8_kv_attention(build("llama"), runtime.kv_cache.scale_values) as fake_quantised:
        want = _generate(fake_quantised, ids, 5)
    assert torch.equal(_generate(model, ids, 5), want) and gated.calls == 0
    gated.gate.set()
    runtime.attention_ready.wait()
    assert torch.equal(_generate(model, ids, 5), want)
    assert runtime.runner.interim is None and gated.calls == 6 * NUM_LAYERS  # the switch's check and 5 steps

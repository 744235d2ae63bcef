"""FlashInfer's host side, without FlashInfer: built JIT modules load without ninja
(`flashinfer_attention._load_built_modules`, with a stand-in flashinfer package: a module is built, FlashInfer's
own path, exactly when its library is missing or older than its sources, its build file or the installed
package), and the plans the captured op runs are those its own thread planned."""

from __future__ import annotations

import os
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from nanoflow_fx.context import StepContext, step_context
from nanoflow_fx.ops import flashinfer_attention


def test_built_modules_load_without_ninja(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    class JitSpec:
        def __init__(self, name: str) -> None:
            self.name = name
            self.sources = [tmp_path / f"{name}.cu"]
            self.ninja_path = tmp_path / f"{name}.ninja"
            self.jit_library_path = tmp_path / f"{name}.so"

        def build(self, verbose: bool, need_lock: bool = True) -> None:
            built.append(self.name)

    package = types.ModuleType("flashinfer")
    package.__file__ = str(tmp_path / "flashinfer_init.py")
    jit, core = types.ModuleType("flashinfer.jit"), types.ModuleType("flashinfer.jit.core")
    core.JitSpec = JitSpec  # type: ignore[attr-defined]
    jit.core = core  # type: ignore[attr-defined]
    package.jit = jit  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.jit", jit)
    monkeypatch.setitem(sys.modules, "flashinfer.jit.core", core)
    monkeypatch.setattr(flashinfer_attention, "_built_modules_patched", False)
    monkeypatch.delenv("NANOFLOW_FX_FLASHINFER_NINJA", raising=False)

    def touch(path: Path, when: int) -> None:
        path.write_text("x")
        os.utime(path, (when, when))

    touch(Path(package.__file__), 100)
    for name in ("fresh", "stale_source", "stale_package", "missing"):
        touch(tmp_path / f"{name}.cu", 200)
        touch(tmp_path / f"{name}.ninja", 200)
    touch(tmp_path / "fresh.so", 300)
    touch(tmp_path / "stale_source.so", 300)
    touch(tmp_path / "stale_source.cu", 400)  # a source changed after the build
    touch(tmp_path / "stale_package.so", 50)  # built before the package was (re)installed

    flashinfer_attention._load_built_modules()
    for name in ("fresh", "stale_source", "stale_package", "missing"):
        JitSpec(name).build(False)
    assert built == ["stale_source", "stale_package", "missing"]


def test_the_captured_op_runs_the_plans_of_its_own_thread() -> None:
    """Two optimized models may step at once from two threads: one's plans must never run the other's step."""
    from nanoflow_fx.ops.backend import AttentionConfig

    config = AttentionConfig(4, 2, 64, 0.125, 0, 0.0)

    class Wrapper:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, q: torch.Tensor, cache: torch.Tensor) -> str:
            return self.name

    backend = flashinfer_attention.FlashInferBackend()
    q, cache = torch.zeros(3, 4, 64), torch.zeros(8, 2, 16, 2, 64)
    args = (q, cache, *(torch.zeros(2, dtype=torch.int32) for _ in range(4)), 0.125, 0, 0.0)
    planned, ran = threading.Event(), {}

    def model_a() -> None:
        with step_context(StepContext(plans={config: flashinfer_attention._Plans(Wrapper("a"), None, 3)})):
            planned.set()
            ran["a"] = backend.run(*args)

    def model_b() -> None:
        planned.wait()
        try:
            ran["b"] = backend.run(*args)
        except RuntimeError as e:
            ran["b"] = str(e)

    threads = [threading.Thread(target=model_a), threading.Thread(target=model_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ran["a"] == "a"
    assert "no FlashInfer plan is active" in ran["b"]  # not model a's plan


def test_an_fp8_cache_gives_flashinfer_its_layers_scales_as_host_floats() -> None:
    """Steps pass FlashInfer each layer's own scales as floats (its API: k_scale into the softmax scale, v_scale on
    the output; a scale of 1.0 not at all) and the query untouched; `set_scales` reaches them; for a scale tensor
    the cache does not know, the device tensors scale the query and the output instead."""
    from nanoflow_fx.ops.backend import AttentionConfig
    from nanoflow_fx.runtime.kv_cache import PagedKVCache

    layers = [AttentionConfig(4, 2, 8, 0.35, 0, 0.0)] * 2
    cache = PagedKVCache(layers, 4, 2, torch.float8_e4m3fn, torch.device("cpu"), model_dtype=torch.bfloat16)
    cache.set_scales([(0.5, 3.0), (1.0, 1.0)])
    calls: list[tuple[torch.Tensor, dict[str, object]]] = []

    class Wrapper:
        def run(self, q: torch.Tensor, kv_cache: torch.Tensor, **kwargs: object) -> torch.Tensor:
            calls.append((q, kwargs))
            return q.clone()

    q = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    run = flashinfer_attention._wrapper_run
    out = run(Wrapper(), q, cache.caches[0], cache.scales[0], scale_values=cache.scale_values_of)
    assert calls[-1][0] is q and calls[-1][1] == {"k_scale": 0.5, "v_scale": 3.0} and torch.equal(out, q)
    run(Wrapper(), q, cache.caches[1], cache.scales[1], scale_values=cache.scale_values_of)
    assert calls[-1][0] is q and calls[-1][1] == {"k_scale": None, "v_scale": None}  # (1.0: nothing applied)
    cache.set_scales([(0.25, 1.0), (2.0, 0.125)])
    run(Wrapper(), q, cache.caches[1], cache.scales[1], scale_values=cache.scale_values_of)
    assert calls[-1][1] == {"k_scale": 2.0, "v_scale": 0.125}

    given = torch.empty_like(q)  # (a scale tensor the cache does not know: the device tensors)
    out = run(Wrapper(), q, cache.caches[1], cache.scales[1].clone(), out=given, scale_values=cache.scale_values_of)
    sent, kwargs = calls[-1]
    assert kwargs == {"out": given}
    assert torch.equal(sent, (q.float() * 2.0).to(q.dtype))
    assert torch.equal(out, (sent.float() * 0.125).to(q.dtype))
    assert cache.scales_version == 2  # (each set_scales: what makes CUDA graphs that took host floats recapture)
    # an fp16 query (a bf16 model's over e4m3) times a large k_scale saturates at fp16's range instead of inf
    q16 = torch.full((3, 4, 8), 3e4, dtype=torch.float16)
    cache.set_scales([(0.25, 1.0), (8.0, 1.0)])
    run(Wrapper(), q16, cache.caches[1], cache.scales[1].clone(), scale_values=cache.scale_values_of)
    assert torch.equal(calls[-1][0], torch.full_like(q16, 65504.0))

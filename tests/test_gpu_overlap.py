"""Nano-batched steps on the fast path (GPU): Inductor pieces, FlashInfer planned per nano-batch, execution units.

Each case runs one mixed step (decodes + a prefill chunk, the engine's dense step) whole and cut into two
nano-batches (at the decode rows and inside the prefill chunk) on every unit mode: one stream, plain streams,
attention on a green-context partition (soft), plus the GEMMs' cuBLASLt SM carve-out, and a hard partition.
bf16 with FlashInfer: within the tolerance of `test_gpu_backends` (2^-5 of the largest logit: the two runs
attend and multiply different row counts, which rounds differently). fp32 with the Triton kernel: the CPU's
bound (1e-5), as the nano-batch property tests hold on the CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import nanoflow_fx
from nanoflow_fx.ops.backend import DecodeKernel, get
from nanoflow_fx.runtime import Chunk
from nanoflow_fx.runtime.program_runner import Cut, make_units
from tests.steps import admit, program_runners, release
from tests.test_gpu_backends import CONFIGS, TOLERANCE, _flashinfer_available

pytestmark = pytest.mark.cuda
MODES = ["off", "streams", "soft", "carveout", "hard", "hard-triton"]


def _model(family: str, dtype: torch.dtype, backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CONFIGS[family]().to(device="cuda", dtype=dtype).eval()
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=16, max_seq_len=160, page_size=16, max_num_tokens=256,
                                        num_pages=256, attention_backend=backend, cuda_graphs=False,
                                        inductor=True, num_nanobatches=2)
    model = nanoflow_fx.optimize(model, config)
    # (until FlashInfer's kernels are built, steps run whole on the interim kernel: these tests cut steps)
    assert model.nanoflow.wait_until_ready()
    return model


def _mixed_step(model: torch.nn.Module, cut: tuple[int, ...] | None, mode: str = "off",
                decode: DecodeKernel | None = None, attention: tuple[int, ...] | None = None) -> torch.Tensor:
    """Logits of every token of one step: 6 decodes at contexts 20-70, then a 50-token prefill chunk (and the
    step's padding token); `cut`: inner boundaries; `decode`: the memory unit's decode kernel; `attention`: the
    attention calls' own inner boundaries."""
    runner = model.nanoflow.runner
    gen = torch.Generator().manual_seed(0)
    lengths = [20, 33, 41, 52, 64, 70, 50]
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]
    requests = admit(runner, prompts, max_new_tokens=1)
    try:
        for req in requests[:-1]:  # decodes: their prefix is in the cache
            runner.run([Chunk(req, len(req.prompt) - 1)], all_logits=True)
            req.num_cached = len(req.prompt) - 1
        units = make_units(mode, 32)
        if decode is not None:
            units = dataclasses.replace(units, decode=decode)
        runner.split_policy = (lambda tokens, decodes: Cut(
            (0, *cut, tokens), units, (0, *attention, tokens) if attention else None)) if cut is not None else None
        chunks = [Chunk(r, 1) for r in requests[:-1]] + [Chunk(requests[-1], 50)]
        return runner.run(chunks, all_logits=True).float()
    finally:
        runner.split_policy = None
        release(runner, requests)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_split_step_on_flashinfer_and_inductor_equals_whole_step(family: str, mode: str) -> None:
    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model(family, torch.bfloat16, "flashinfer")
    want = _mixed_step(model, None)
    for cut in ((6,), (30,)):  # at the decode rows; inside the prefill chunk
        got = _mixed_step(model, cut, mode)
        assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item(), cut
    program = program_runners(model)[0]
    assert program.last_schedule is not None and program.last_schedule.split("nb").boundaries[:2] == (0, 30)
    assert program.program.compiles > 0  # the pieces are Inductor's


@pytest.mark.parametrize("mode", ["off", "streams", "soft", "carveout"])
def test_uneven_split_step_on_flashinfer_equals_whole_step(mode: str) -> None:
    """Dense pieces in 2 nano-batches, attention calls in 4 (NanoFlow's uneven split; one attention nano-batch
    spans the decode rows and the chunk), FlashInfer planned per attention nano-batch: the whole step's logits
    within bf16 tolerance, and the program ran both splits."""
    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model("llama", torch.bfloat16, "flashinfer")
    want = _mixed_step(model, None)
    got = _mixed_step(model, (30,), mode, attention=(3, 10, 40))
    assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item()
    program = program_runners(model)[0]
    splits = dict(program.last_schedule.splits)
    assert splits["nb"].boundaries[:2] == (0, 30) and splits["attn"].boundaries[:4] == (0, 3, 10, 40)


@pytest.mark.parametrize("launch", [(), (("block_n", 32), ("num_stages", 7)), (("pv_precision", "half"),)])
def test_split_step_with_triton_decoding_on_the_memory_unit_equals_whole_step(launch: tuple) -> None:
    """FlashInfer step, the memory unit's decode rows on the Triton kernel (as the search may choose): the same
    logits within bf16 tolerance; the prefill rows stay on FlashInfer's prefill kernel."""
    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model("llama", torch.bfloat16, "flashinfer")
    want = _mixed_step(model, None)
    calls = []
    triton = get("triton")
    original = triton.kernel
    try:
        triton.kernel = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)  # type: ignore[method-assign]
        for cut in ((6,), (3,), (30,)):  # decode rows alone; split among them; with the prefill chunk
            got = _mixed_step(model, cut, "soft", DecodeKernel("triton", launch))
            assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item(), cut
    finally:
        vars(triton).pop("kernel", None)  # the class's kernel again
    layers = model.config.num_hidden_layers
    assert calls == [6] * layers + [3, 3] * layers + [6] * layers  # decode rows only, per nano-batch and layer


@pytest.mark.parametrize("mode", ["off", "soft", "carveout"])
def test_split_step_in_fp32_equals_whole_step_as_on_the_cpu(mode: str) -> None:
    model = _model("llama", torch.float32, "triton")
    want = _mixed_step(model, None)
    got = _mixed_step(model, (6, 31), mode)
    assert (got - want).abs().max().item() <= 1e-5


def test_profile_step_writes_a_chrome_trace_and_a_timeline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real profiled step cut into two nano-batches on two units: both streams ran kernels, the trace is a Chrome
    trace (Perfetto's format), the PNG is written."""
    import json

    from nanoflow_fx.cost.model import StepShape
    from nanoflow_fx.explain import profile_step

    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model("llama", torch.bfloat16, "flashinfer")
    units = make_units("streams", 0)
    policy = lambda tokens, decodes: Cut((0, decodes, tokens), units)  # noqa: E731
    trace, png = tmp_path / "step.json", tmp_path / "step.png"
    result = profile_step(model, StepShape(8, 64, 100), str(trace), str(png), policy=policy)
    assert len(result.busy_ms()) >= 2 and result.by_kind_ms().get("attention", 0) > 0
    assert json.loads(trace.read_text())["traceEvents"] and png.stat().st_size > 0


@pytest.mark.parametrize("mode", ["off", "soft"])
def test_a_captured_split_step_replays_the_eager_one(mode: str) -> None:
    """`StepRunner.capture_step` (what the search's graph timings replay): a split step on FlashInfer + Inductor
    (decode rows on the Triton kernel on the memory unit) captured in a CUDA graph writes, at each replay, the
    logits the same step computes eagerly."""
    from nanoflow_fx.cost.measure import StepHarness
    from nanoflow_fx.cost.model import StepShape

    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    model = _model("llama", torch.bfloat16, "flashinfer")
    runner = model.nanoflow.runner
    harness = StepHarness(model.nanoflow, StepShape(6, 40, 30), model.config.vocab_size)
    units = make_units(mode, 32)
    if units is not None:
        units = dataclasses.replace(units, decode=DecodeKernel("triton", (("pv_precision", "half"),)))
    try:
        runner.split_policy = lambda tokens, decodes: Cut((0, decodes + 10, tokens), units)
        eager = runner.run(harness.chunks).float()
        captured = runner.capture_step(harness.chunks)
        for _ in range(3):  # (allocations between replays must not touch what the graph reads)
            captured.logits.zero_()
            got = captured.replay().float()
            assert torch.equal(got, eager)
        assert harness.time_graph(runner.split_policy, reps=2, rounds=1) > 0
    finally:
        runner.split_policy = None
        harness.release()


def test_auto_measures_the_memory_units_decode_kernels_and_picks_per_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """num_nanobatches="auto" on CUDA (FlashInfer): the decode rows timed on 32 and 48 SMs with FlashInfer's own
    kernel and the Triton variant, the fastest per share offered to the search, a pick per tuned shape that is
    the unsplit step unless a cut beat it by more than 1%, and explain() lists both. A fresh cache directory: the
    cost table is measured here (a table kept from an earlier run would cut the replays short)."""
    from nanoflow_fx.cost.autotune import AUTO_DECODE_VARIANT
    from nanoflow_fx.cost.model import UNSPLIT
    from nanoflow_fx.explain import explain

    if not _flashinfer_available():
        pytest.skip("flashinfer is not installed")
    torch.manual_seed(0)
    model = CONFIGS["llama"]().to(device="cuda", dtype=torch.bfloat16).eval()
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=16, max_seq_len=160, page_size=16, max_num_tokens=256,
                                        num_pages=256, attention_backend="flashinfer", num_nanobatches="auto",
                                        cache_dir=str(tmp_path / "cache"))
    runtime = nanoflow_fx.optimize(model, config).nanoflow
    timings = runtime.decode_timings
    assert {(t.sms, t.kernel) for t in timings} == {
        (k, kernel) for k in (16, 32, 48, 64) for kernel in (None, AUTO_DECODE_VARIANT)} and len(timings) == 8
    assert all(t.ms > 0 and t.tb_s > 0 for t in timings)
    assert runtime.tunings and runtime.cost_table is not None
    for tuning in runtime.tunings:
        measured = dict(tuning.measured)
        assert tuning.chosen == UNSPLIT or measured[tuning.chosen] < 0.99 * measured[UNSPLIT]
        # predicted from the cost table, fewer replayed than predicted, the unsplit step always among them
        assert UNSPLIT in measured and len(tuning.predicted) > len(measured) > 1
        # the pieces' events time the GPU's work: their sum cannot be much above the step's own time
        unsplit = runtime.cost_table.predict(tuning.shape, UNSPLIT)
        assert 0 < unsplit.gpu_ms <= 1.05 * measured[UNSPLIT]
    text = "\n".join(explain(model).searched)
    assert "decode rows on 32 SMs" in text and "runs" in text and "predicted" in text
    # predicted against measured busy time per unit, on a real profiled step cut as the search chose
    from nanoflow_fx.explain import compare_step

    shape = runtime.tunings[0].shape
    compared = compare_step(model, shape)
    assert compared.candidate == runtime.tunings[0].chosen.label()
    assert compared.predicted_busy["compute"] > 0 and compared.measured_busy["compute"] > 0
    assert compared.measured_ms > 0 and "step" in str(compared)
    # explain() with timelines: the same per tuned shape, each profiled step's Chrome trace and PNG written
    from nanoflow_fx.cost.model import shape_key

    explained = explain(model, timelines=str(tmp_path / "timelines"))
    assert [u.shape for u in explained.units] == [t.shape for t in runtime.tunings]
    for u in explained.units:
        name = tmp_path / "timelines" / shape_key(u.shape)
        assert Path(f"{name}.json").stat().st_size > 0 and Path(f"{name}.png").stat().st_size > 0
    assert "per unit, predicted against a profiled step" in str(explained)
    # optimized again with the table kept: no shape replays more than it did, the unsplit step always
    first = {t.shape: len(t.measured) for t in runtime.tunings}
    again = nanoflow_fx.optimize(model, config).nanoflow
    assert again.cost_table is not None and again.tunings
    for tuning in again.tunings:
        measured = dict(tuning.measured)
        assert UNSPLIT in measured and len(measured) <= first.get(tuning.shape, len(measured))

"""`explain(model)`: printable, and its parts are the real graph, plan, schedule and pass records."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoflow_fx
from nanoflow_fx.runtime.program_runner import program_schedule
from nanoflow_fx.schedule import parse_schedule, validate
from tests.conftest import DEFAULT_CONFIG, optimized
from tests.test_generate_parity import _left_padded_batch


def test_explain_a_nanobatched_model_shows_the_program_and_cut_that_run() -> None:
    model = optimized("llama", dataclasses.replace(DEFAULT_CONFIG, num_nanobatches=2))
    ids, mask = _left_padded_batch([3, 12, 7, 9])
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    e = nanoflow_fx.explain(model, num_tokens=40)
    # 2 layers x 4 GEMMs (Q/K/V fused, O, gate/up fused, down) + the LM head
    assert e.op_counts["attention"] == 2 and e.op_counts["gemm"] == 9
    program = model.nanoflow.step_fn.program
    assert e.pieces == tuple(p.name + ("*" if p.whole else "") for p in program.pieces)
    assert e.pieces == ("P0", "L0.attn", "P1", "L1.attn", "P2*")  # the LM head's piece mixes tokens
    assert [r.name for r in e.passes] == ["fuse_linears", "annotate", "lower"]
    assert e.passes[0].changed == 4 and e.passes[-1].nodes_after == 5
    assert e.cut.startswith("cut at [0, 20, 40]")
    schedule = parse_schedule(e.schedule_text)
    validate(schedule)
    assert schedule == program_schedule(program, (0, 20, 40), one_unit=True)  # what the runner runs for that cut
    assert dict(schedule.splits)["nb"].boundaries == (0, 20, 40)
    assert model.nanoflow.lowering.key in e.lowering
    text = str(e)
    for part in ("LlamaForCausalLM", "fuse_linears", "annotate", "L1.attn", "a step of 40 tokens", "cut at"):
        assert part in text
    assert e.graphs.startswith("off (") and f"CUDA graphs: {e.graphs}" in text  # (a CPU model has none)


def test_explain_an_unsplit_model_and_a_bare_model() -> None:
    e = nanoflow_fx.explain(optimized("qwen2"), num_tokens=16)
    assert e.cut.startswith("run whole")
    schedule = parse_schedule(e.schedule_text)
    assert {op.unit for op in schedule.ops} == {"compute"} and all(op.nanobatch == 0 for op in schedule.ops)
    from tests.tiny_models import build

    with pytest.raises(ValueError, match="optimize"):
        nanoflow_fx.explain(build("qwen2"))


def test_explain_a_step_loaded_from_the_saved_step(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A second process's model runs the saved step (no trace): explain() shows the loaded program as it runs."""
    from tests.tiny_models import build

    monkeypatch.delenv("NANOFLOW_FX_SAVE_STEP", raising=False)  # (conftest turns saving off for other tests)

    config = dataclasses.replace(DEFAULT_CONFIG, save_step=True, cache_dir=str(tmp_path), num_nanobatches=2)
    first = nanoflow_fx.optimize(build("llama"), config)
    assert first.nanoflow.step_fn.store is not None and first.nanoflow.step_fn.store.path.exists()
    second = nanoflow_fx.optimize(build("llama"), config)
    assert second.nanoflow.step_fn.loaded is not None and not second.nanoflow.step_fn.captures
    e = nanoflow_fx.explain(second, num_tokens=12)
    assert e.source.startswith("loaded from the saved step") and e.op_counts == {} and e.passes == ()
    assert e.pieces == ("P0", "L0.attn", "P1", "L1.attn", "P2*") and e.cut.startswith("cut at [0, 6, 12]")


def test_chrome_trace_kernels_become_a_timeline_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What `profile_step` does with a real step's torch.profiler trace: kernels by stream and class, busy time
    per stream, the span, and a PNG (here on a trace written by hand in the profiler's format)."""
    from nanoflow_fx.explain import StepProfile, draw_timeline, spans_from_chrome_trace

    trace = {"traceEvents": [
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x160_64x4_4x1_v_bz_coopA_TNT", "tid": 7, "ts": 100.0,
         "dur": 400.0},
        {"cat": "kernel", "name": "void flashinfer::BatchPrefillWithPagedKVCacheKernel<...>", "tid": 9, "ts": 150.0,
         "dur": 300.0},
        {"cat": "kernel", "name": "triton_poi_fused_add_mul_0", "tid": 7, "ts": 500.0, "dur": 50.0},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 90.0, "dur": 5.0},
    ]}
    profile = StepProfile(spans_from_chrome_trace(trace))
    assert [s.kind for s in profile.spans] == ["gemm", "attention", "other"]
    assert profile.busy_ms() == {"7": 0.45, "9": 0.3} and profile.span_ms == 0.45
    assert profile.by_kind_ms() == {"gemm": 0.4, "attention": 0.3, "other": 0.05}
    assert profile.concurrent_ms() == pytest.approx(0.3) and profile.union_ms() == pytest.approx(0.45)
    path = tmp_path / "timeline.png"
    draw_timeline(profile, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_profiled_steps_streams_become_units_and_are_compared_with_the_prediction() -> None:
    """`compare_step`'s pure part: a stream mostly running attention is the memory unit's, the others the compute
    unit's; the comparison prints predicted and measured ms per unit and for the step."""
    from nanoflow_fx.explain import KernelSpan, StepProfile, UnitComparison, unit_busy_ms

    profile = StepProfile((KernelSpan("7", "nvjet", "gemm", 0.0, 4000.0), KernelSpan("7", "fa", "attention", 4000.0,
                                                                                    5000.0),
                           KernelSpan("9", "fa", "attention", 1000.0, 3000.0),
                           KernelSpan("9", "triton_poi", "other", 3000.0, 3500.0),
                           KernelSpan("11", "nvjet", "gemm", 0.0, 500.0)))
    assert unit_busy_ms(profile) == {"compute": 5.5, "memory": 2.5}
    assert profile.concurrent_ms() == 2.0 and profile.union_ms() == 5.0  # the attention at 4-5 ms ran alone
    text = str(UnitComparison("S", "0.5 soft32", 6.0, {"compute": 5.0, "memory": 2.0}, profile.span_ms,
                              unit_busy_ms(profile), 1.5, profile.concurrent_ms()))
    assert text.splitlines()[0] == "S: 0.5 soft32"
    assert "compute           5.00         5.50" in text and "step              6.00         5.00" in text
    assert "both              1.50         2.00" in text


def test_explain_with_timelines_needs_an_auto_tuned_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="num_nanobatches='auto'"):
        nanoflow_fx.explain(optimized("llama"), timelines=str(tmp_path))


def test_compare_step_needs_an_auto_tuned_model() -> None:
    from nanoflow_fx.cost.model import StepShape
    from nanoflow_fx.explain import compare_step

    with pytest.raises(ValueError, match="num_nanobatches='auto'"):
        compare_step(optimized("llama"), StepShape(2, 8, 8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["gemm", "attention", "other"]), st.integers(0, 60), st.integers(1, 30)),
                min_size=1, max_size=12))
def test_concurrent_time_is_the_time_attention_and_other_kernels_share(kernels) -> None:  # type: ignore[no-untyped-def]
    """`StepProfile.concurrent_ms` against counting microsecond by microsecond, whatever the streams."""
    from nanoflow_fx.explain import KernelSpan, StepProfile

    profile = StepProfile(tuple(KernelSpan(str(i % 3), kind, kind, float(start), float(start + length))
                                for i, (kind, start, length) in enumerate(kernels)))
    running = [{kind for kind, start, length in kernels if start <= t < start + length} for t in range(100)]
    assert profile.concurrent_ms() == pytest.approx(
        sum("attention" in r and len(r - {"attention"}) > 0 for r in running) / 1e3)
    assert profile.union_ms() == pytest.approx(sum(bool(r) for r in running) / 1e3)

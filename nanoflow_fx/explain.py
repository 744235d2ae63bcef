"""`explain(model)`: what runs for an optimized model: the lowering's passes, the program, the cut, the schedule."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

from nanoflow_fx.capture.lowering import PassRun
from nanoflow_fx.passes import info
from nanoflow_fx.schedule import format_schedule
from nanoflow_fx.schedule.timeline import covered_length, overlap_length

__all__ = ["Explanation", "KernelSpan", "StepProfile", "UnitComparison", "compare_step", "draw_timeline", "explain",
           "profile_harness", "profile_step", "spans_from_chrome_trace", "unit_busy_ms"]


@dataclass(frozen=True)
class Explanation:
    """What `explain()` found (its `str` is the report)."""

    model: str
    lowering: str  # the pass list, in order, and its key
    source: str  # where the program that runs came from: traced, replicated, loaded from the saved step
    op_counts: dict[str, int]  # the captured ATen graph's ops by class (empty for a loaded step)
    passes: tuple[PassRun, ...]  # each pass as it ran on the captured graph: node counts, what it changed, time
    pieces: tuple[str, ...]  # the program's pieces in order ("*": kept whole, it mixes tokens)
    compiles: int  # distinct dense pieces Inductor compiled
    num_tokens: int  # the step shape the cut and schedule below are for
    num_decodes: int
    cut: str  # how the runtime cuts that step
    schedule_text: str  # the Schedule it runs (`schedule.format_schedule`)
    graphs: str = ""  # the decode steps' CUDA graphs: their buckets and whether each was captured cut, or why off
    searched: tuple[str, ...] = ()  # num_nanobatches="auto": per tuned step shape, the pick, measured and predicted
    units: tuple[UnitComparison, ...] = ()  # explain(..., timelines=dir): per tuned shape, predicted vs profiled

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items())) or "(not traced in this process)"
        kinds = Counter("attention" if ".attn" in p else "dense" for p in self.pieces)
        whole = [p.rstrip("*") for p in self.pieces if p.endswith("*")]
        return "\n".join([
            f"nanoflow_fx: {self.model}",
            f"lowering: {self.lowering}",
            f"step: {self.source}; captured graph ops by class: {counts}",
            "passes:", *(f"  {r}" for r in self.passes),
            f"program: {len(self.pieces)} pieces ({kinds['dense']} dense, {kinds['attention']} attention calls; "
            f"{self.compiles} distinct pieces compiled by Inductor); kept whole (they mix tokens): "
            f"{' '.join(whole) or 'none'}",
            "  " + " ".join(self.pieces),
            f"a step of {self.num_tokens} tokens ({self.num_decodes} decodes): {self.cut}",
            "schedule:", self.schedule_text.rstrip(),
            *([f"CUDA graphs: {self.graphs}"] if self.graphs else []),
            *(["schedule search (measured on the device; predicted by the cost table):", *self.searched]
              if self.searched else []),
            *(["per unit, predicted against a profiled step (ms):", *map(str, self.units)] if self.units else []),
        ])


def explain(model: PreTrainedModel, num_tokens: int | None = None, num_decodes: int = 0,
            timelines: str | None = None) -> Explanation:
    """Explain what runs for an optimized model: the lowering's passes as they ran, the lowered program, and how
    a step of `num_tokens` tokens (`num_decodes` of them decodes; default: the largest step, the step budget) is
    cut and scheduled. `timelines` (a directory; CUDA models optimized with num_nanobatches="auto"): also run one
    real step of each tuned shape cut as the search chose, profiled (`compare_step`): its predicted against
    measured busy time per unit in `Explanation.units`, and its timeline there as `<shape>.png` and
    `<shape>.json` (`cost.model.shape_key`; the JSON a Chrome trace that Perfetto opens)."""
    from nanoflow_fx.runtime.program_runner import cut_bounds, program_schedule

    runtime = getattr(model, "nanoflow", None)
    step_fn = getattr(runtime, "step_fn", None)
    if runtime is None or step_fn is None or step_fn.program is None:
        raise ValueError("explain() needs a model returned by nanoflow_fx.optimize() (with check_capture on, or "
                         "after one generate() call, so that a step has been captured)")
    program = step_fn.program
    capture = step_fn.captures[-1] if step_fn.captures else None
    if step_fn.loaded is not None:
        source = f"loaded from the saved step {step_fn.store.path if step_fn.store else ''}".rstrip()
    elif capture is not None and capture.replicated is not None:
        traced, layers, period = capture.replicated
        source = f"traced {traced} of {layers} layers, replicated (period {period})"
    else:
        source = "traced"
    counts = Counter(info(n).op_class for n in capture.graph.graph.nodes
                     if n.op == "call_function" and "nanoflow" in n.meta) if capture is not None else Counter()
    cfg = runtime.config
    tokens = int(num_tokens if num_tokens is not None else cfg.max_num_tokens)
    policy = runtime.runner.split_policy
    cut = policy(tokens, num_decodes) if policy is not None else None
    if cut is None or cut_bounds(cut, tokens) is None:
        how, schedule = "run whole (one nano-batch)", program_schedule(program, (0, tokens), one_unit=True)
    else:
        units = "one stream, in the schedule's order" if cut.units is None else (
            f"units {cfg.experimental.sm_partition if not runtime.tunings else 'as the search chose'}")
        attention = f", attention at {list(cut.attention)}" if cut.attention is not None else ""
        how = f"cut at {list(cut.boundaries)}{attention}; {units}"
        schedule = program_schedule(program, cut.boundaries, cut.units is None, cut.attention)
    searched = tuple(_searched(t) for t in runtime.tunings) + tuple(
        f"  decode rows on {t.sms} SMs: {t.kernel.label() if t.kernel else runtime.attention_backend.name} "
        f"{t.ms:.3f} ms ({t.tb_s:.2f} TB/s)" for t in runtime.decode_timings)
    units_found = _profiled_units(model, runtime, timelines) if timelines is not None else ()
    pieces = tuple(p.name + ("*" if p.whole else "") for p in program.pieces)
    return Explanation(type(model).__name__, f"{runtime.lowering.describe()} (key {runtime.lowering.key})", source,
                       dict(counts), tuple(capture.passes) if capture is not None else (), pieces, program.compiles,
                       tokens, num_decodes, how, format_schedule(schedule), _graphs(runtime.runner), searched,
                       units_found)


def _graphs(runner: Any) -> str:
    """The decode buckets' CUDA graphs as captured: whole, or each one's cut; or why there are none."""
    graphs = runner.cuda_graphs
    if graphs is None:
        return f"off ({runner.cuda_graphs_off_reason})"
    cuts = {shape.tokens: g.nanobatches.boundaries if g.nanobatches is not None else None
            for shape, g in sorted(graphs.graphs.items(), key=lambda item: item[0].tokens)}
    if not any(cuts.values()):
        return f"decode buckets {list(cuts)}, each replayed whole"
    return "decode buckets cut at " + ", ".join(f"{b}: {list(c) if c else 'whole'}" for b, c in cuts.items())


def _profiled_units(model: PreTrainedModel, runtime: Any, directory: str) -> tuple[UnitComparison, ...]:
    """`compare_step` for each shape the search tuned, its trace and PNG written to `directory`."""
    import os

    from nanoflow_fx.cost.model import shape_key

    if not runtime.tunings:
        raise ValueError("explain(model, timelines=...) needs a CUDA model optimized with num_nanobatches='auto' "
                         "(it profiles the step shapes the schedule search tuned)")
    os.makedirs(directory, exist_ok=True)
    found = []
    for tuning in runtime.tunings:
        name = os.path.join(directory, shape_key(tuning.shape))
        found.append(compare_step(model, tuning.shape, name + ".json", name + ".png"))
    return tuple(found)


def _searched(tuning: Any) -> str:
    measured = sorted(tuning.measured, key=lambda item: item[1])
    predicted = dict(tuning.predicted)
    best = ", ".join(f"{c.label()} {ms:.2f}" + (f" (predicted {predicted[c]:.2f})" if c in predicted else "")
                     for c, ms in measured[:4])
    ranked = f" of {len(predicted)} predicted" if predicted else ""
    return (f"  {tuning.shape}: runs {tuning.chosen.label()} ({tuning.seconds:.1f} s, {len(measured)} candidates "
            f"replayed{ranked}; fastest ms: {best})")


@dataclass(frozen=True)
class KernelSpan:
    """One kernel of a profiled step: the stream it ran on, its name and class, and when (µs from the first)."""

    stream: str
    name: str
    kind: str  # "gemm" | "attention" | "other"
    start_us: float
    end_us: float


@dataclass(frozen=True)
class StepProfile:
    """A real step, profiled: its kernels, each stream's busy time, and the span from first start to last end."""

    spans: tuple[KernelSpan, ...]

    @property
    def span_ms(self) -> float:
        return (max(s.end_us for s in self.spans) - min(s.start_us for s in self.spans)) / 1e3 if self.spans else 0.0

    def busy_ms(self) -> dict[str, float]:
        busy: dict[str, float] = {}
        for s in self.spans:
            busy[s.stream] = busy.get(s.stream, 0.0) + (s.end_us - s.start_us) / 1e3
        return busy

    def by_kind_ms(self) -> dict[str, float]:
        kinds: dict[str, float] = {}
        for s in self.spans:
            kinds[s.kind] = kinds.get(s.kind, 0.0) + (s.end_us - s.start_us) / 1e3
        return kinds

    def concurrent_ms(self, kind: str = "attention") -> float:
        """ms during which a kernel of `kind` and a kernel of another kind ran at the same time (on any streams):
        the overlap the units achieved. Zero when a step's kernels never co-ran, whatever streams they were on."""
        return overlap_length(((s.start_us, s.end_us) for s in self.spans if s.kind == kind),
                              ((s.start_us, s.end_us) for s in self.spans if s.kind != kind)) / 1e3

    def union_ms(self) -> float:
        """ms during which any kernel ran (the span less the gaps where the GPU was idle)."""
        return covered_length((s.start_us, s.end_us) for s in self.spans) / 1e3

    def __str__(self) -> str:
        busy = ", ".join(f"stream {k} {v:.2f} ms" for k, v in self.busy_ms().items())
        kinds = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.by_kind_ms().items()))
        return f"step span {self.span_ms:.2f} ms; busy: {busy}; kernels: {kinds}"


def kernel_kind(name: str) -> str:
    """The class of a CUDA kernel, by its name (FlashInfer/Triton attention, cuBLAS/cuBLASLt GEMMs, the rest)."""
    lowered = name.lower()
    if any(k in lowered for k in ("flashinfer", "batchprefill", "batchdecode", "attention")):
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "cutlass", "xmma", "matmul")):
        return "gemm"
    return "other"


def spans_from_chrome_trace(trace: dict[str, Any]) -> tuple[KernelSpan, ...]:
    """The kernels of a torch.profiler Chrome trace (events of category "kernel"; their "tid" is the stream)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    if not events:
        return ()
    origin = min(float(e["ts"]) for e in events)
    return tuple(KernelSpan(str(e["tid"]), e["name"], kernel_kind(e["name"]), float(e["ts"]) - origin,
                            float(e["ts"]) - origin + float(e["dur"])) for e in events)


def draw_timeline(profile: StepProfile, path: str, title: str = "") -> None:
    """A PNG of the step's kernels: one row per stream, GEMMs / attention / other in three colours
    (needs matplotlib: `pip install matplotlib`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("draw_timeline() needs matplotlib: pip install matplotlib") from err
    colours = {"gemm": "#1f77b4", "attention": "#d62728", "other": "#7f7f7f"}
    streams = sorted({s.stream for s in profile.spans})
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.6 * len(streams)))
    for row, stream in enumerate(streams):
        for kind, colour in colours.items():
            bars = [(s.start_us / 1e3, (s.end_us - s.start_us) / 1e3) for s in profile.spans
                    if s.stream == stream and s.kind == kind]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour, label=kind if row == 0 else None)
    ax.set_yticks(range(len(streams)), [f"stream {s}" for s in streams])
    ax.set_xlabel("ms")
    ax.set_title(title or str(profile))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_step(model: PreTrainedModel, shape: Any, chrome_trace: str | None = None, png: str | None = None,
                 policy: Any = "model") -> StepProfile:
    """Run one dense step of `shape` (a `cost.model.StepShape`) on an optimized CUDA model, as its runtime cuts it
    (or under `policy`, a split policy; None: whole), profiled with torch.profiler. Writes the Chrome trace
    (Perfetto opens it) and a PNG timeline when given paths."""

    from nanoflow_fx.cost.measure import StepHarness

    runtime = getattr(model, "nanoflow", None)
    if runtime is None or runtime.device.type != "cuda":
        raise ValueError("profile_step() needs a CUDA model returned by nanoflow_fx.optimize()")
    harness = StepHarness(runtime, shape, model.config.get_text_config().vocab_size)
    try:
        result = profile_harness(harness, policy, chrome_trace)
    finally:
        harness.release()
    if png:
        draw_timeline(result, png)
    return result


def profile_harness(harness: Any, policy: Any = "model", chrome_trace: str | None = None,
                    graph: bool = False) -> StepProfile:
    """Profile one step of a `cost.measure.StepHarness` (its runtime's split policy, or `policy`), after one
    unprofiled run; writes the Chrome trace to `chrome_trace` when given. `graph`: the step captured in a CUDA
    graph (`StepRunner.capture_step`) and one replay profiled: the GPU's work without the host's issue gaps (the
    trace may then show the graph's kernels on the stream that replayed it; `StepProfile.concurrent_ms` does not
    depend on streams)."""
    import json
    import os
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from nanoflow_fx.runtime.step_runner import RUNNER_POLICY

    runner = harness.runtime.runner
    split = RUNNER_POLICY if policy == "model" else policy
    step = (runner.capture_step(harness.chunks, split=split).replay if graph
            else lambda: runner.run(harness.chunks, split=split))
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    path = chrome_trace or os.path.join(tempfile.mkdtemp(), "step_trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return StepProfile(spans_from_chrome_trace(json.load(f)))


def unit_busy_ms(profile: StepProfile) -> dict[str, float]:
    """A profiled step's busy ms per execution unit: a stream whose kernels are mostly attention is the memory
    unit's, any other the compute unit's (the runtime issues attention on the memory unit, the rest on compute)."""
    by_stream: dict[str, dict[str, float]] = {}
    for span in profile.spans:
        kinds = by_stream.setdefault(span.stream, {})
        kinds[span.kind] = kinds.get(span.kind, 0.0) + (span.end_us - span.start_us) / 1e3
    units: dict[str, float] = {}
    for kinds in by_stream.values():
        busy = sum(kinds.values())
        unit = "memory" if kinds.get("attention", 0.0) > busy / 2 else "compute"
        units[unit] = units.get(unit, 0.0) + busy
    return units


@dataclass(frozen=True)
class UnitComparison:
    """One step shape as the runtime cuts it: the cost table's prediction per unit against a real profiled step."""

    shape: Any
    candidate: str
    predicted_ms: float  # the GPU's predicted makespan
    predicted_busy: dict[str, float]
    measured_ms: float  # the profiled step's span, first kernel start to last kernel end
    measured_busy: dict[str, float]
    predicted_overlap_ms: float = 0.0  # both units at once, as predicted (kernels timed alone)
    measured_overlap_ms: float = 0.0  # attention co-running with other kernels in the profiled step

    def __str__(self) -> str:
        """Per unit, predicted against measured busy ms; "both": the time the units ran at once. A unit measured
        busier than predicted while they overlapped is the interference between them."""
        rows = [f"{self.shape}: {self.candidate}",
                f"  {'unit':<8} {'predicted ms':>13} {'measured ms':>12}",
                *(f"  {u:<8} {self.predicted_busy.get(u, 0.0):13.2f} {self.measured_busy.get(u, 0.0):12.2f}"
                  for u in sorted(set(self.predicted_busy) | set(self.measured_busy))),
                f"  {'both':<8} {self.predicted_overlap_ms:13.2f} {self.measured_overlap_ms:12.2f}",
                f"  {'step':<8} {self.predicted_ms:13.2f} {self.measured_ms:12.2f}"]
        return "\n".join(rows)


def compare_step(model: PreTrainedModel, shape: Any, chrome_trace: str | None = None,
                 png: str | None = None) -> UnitComparison:
    """Predicted against measured busy time per unit for one dense step of `shape` (a `cost.model.StepShape`), cut
    as the runtime's search cut its nearest tuned shape (`num_nanobatches="auto"` on CUDA): the cost table's
    prediction (its missing nano-batch shapes measured first), then the real step profiled (`profile_step`, with
    the Chrome trace and PNG timeline when given paths)."""
    from nanoflow_fx.cost.measure import predict_candidates
    from nanoflow_fx.cost.model import UNSPLIT, policy_for
    from nanoflow_fx.runtime.program_runner import make_units

    runtime = getattr(model, "nanoflow", None)
    table = getattr(runtime, "cost_table", None)
    if runtime is None or table is None:
        raise ValueError("compare_step() needs a CUDA model optimized with num_nanobatches='auto' (it reads the "
                         "cost table the schedule search measured)")
    policy = runtime.split_policy
    nearest = policy.nearest(shape.tokens, shape.decodes) if policy is not None else None
    candidate = policy.chosen[nearest] if nearest is not None else UNSPLIT
    vocab_size = model.config.get_text_config().vocab_size
    prediction = predict_candidates(runtime, vocab_size, table, shape, [candidate]).get(candidate)
    if prediction is None:
        raise ValueError(f"the cost table cannot price {candidate.label()} on {shape} (a time it needs could not be "
                         "measured: see the warnings)")
    profile = profile_step(model, shape, chrome_trace, png, policy=policy_for(candidate, make_units))
    return UnitComparison(shape, candidate.label(), prediction.gpu_ms, dict(prediction.busy), profile.span_ms,
                          unit_busy_ms(profile), prediction.overlap_ms, profile.concurrent_ms())

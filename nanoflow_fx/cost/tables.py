"""Per-op-group time tables, and the step time they predict for a cut: what the schedule search ranks by.

`CostTable` is measured on the device when `num_nanobatches="auto"` tunes (`measure_shape`, `measure_carveout`;
decode-row timings from `cost.profile.decode_kernel_timings`) and kept on disk (`load_table` / `save_table`, keyed
by `table_key`: the model's configuration and dtype, the lowering, the device and the library versions). It holds:

- `pieces`: each piece of the step program (a dense piece: a layer's GEMMs with the code Inductor fused around
  them; an attention call) timed on a whole step of one nano-batch's shape (its decode rows at the tuned context,
  its prefill tokens), on the whole GPU: CUDA events between the pieces (`program_runner.PieceTimer`), the step
  queued behind a sleep kernel so that the host's issue time does not show;
- `carveout`: per SM share k, the dense pieces' time with the GEMMs' cuBLASLt carve-out of k SMs over their time
  without it;
- `decode`: the decode rows' attention per SM share and kernel, for `decode_ref` = (decodes, context);
- `host_ms`: the host's time to issue each tuned shape's unsplit step, and `host_split_ms` the same step cut in
  two halves on one stream (`measure_split_host`): what one more nano-batch costs the host (not as much again: on
  an H200, the 8B balanced step of 1056 tokens took 18.7 ms to issue unsplit and 28.2-29.9 ms cut in two on one
  stream, RESULTS.md);
- `calibration`: per tuned shape and unit mode, measured / predicted step time over the candidates the search
  replayed (the interference between units, and whatever else the model leaves out, measured rather than
  assumed); a shape not replayed yet takes its mode's median over the shapes that were (one factor per mode
  shared by all shapes was measured to be too coarse: a prefill step's factor mispriced a mixed step by 20%).

Assumed, not measured (the calibration absorbs what they miss): a prefill row's attention on k of the GPU's S SMs
takes S/k times its whole-GPU time (compute-bound); decode rows' attention time scales with their KV tokens; every
nano-batch past the first costs the host what the second one did (`host_split_ms - host_ms`; counted as (n + m) / 2
nano-batches with the attention calls cut apart into m; without `host_split_ms`, n times the unsplit step's issue
time). (A later nano-batch of a prefill chunk is measured with the chunk's earlier tokens cached as its prefix, as
the cut step runs it.)

`CostTable.predict(shape, candidate)`: the cut's Schedule (`program_runner.schedule_of`, from the program's
shape kept in the table), simulated with those times (`schedule.simulate`); the step takes the longer of the GPU's
makespan and the host's issue time, times the calibration. Pure given the table: tested on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nanoflow_fx.cost.search import Candidate, StepShape
from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.program_runner import make_units, schedule_of
from nanoflow_fx.schedule import NanoOp, simulate

__all__ = ["CostTable", "Prediction", "decode_key", "load_table", "measure_carveout", "measure_shape",
           "measure_split_host", "mode_of", "save_table", "shape_key", "subshapes", "table_key"]

FORMAT = 2  # 2: calibration per (mode, shape)


def shape_key(shape: StepShape) -> str:
    return f"{shape.decodes}x{shape.context}+{shape.prefill}" + (f"@{shape.prefix}" if shape.prefix else "")


def decode_key(sms: int, kernel: DecodeKernel | None) -> str:
    return f"{sms}|{kernel.label() if kernel is not None else 'own'}"


def mode_of(candidate: Candidate) -> str:
    """The unit mode a candidate's calibration is kept under: "unsplit", or its units ("off", "streams", ...)."""
    return "unsplit" if candidate.unsplit else candidate.units


def subshapes(shape: StepShape, candidate: Candidate, attention: bool = False) -> list[StepShape]:
    """Each nano-batch of `shape` cut like `candidate` (its attention calls' nano-batches with `attention`), as a
    step shape of its own (decode rows come first; a later piece of the prefill chunk has the chunk's earlier
    tokens as its prefix)."""
    dense = candidate.boundaries(shape.tokens, shape.decodes) or (0, shape.tokens)
    bounds = (candidate.attention_boundaries(shape.tokens, shape.decodes) or dense) if attention else dense
    found = []
    for start, end in zip(bounds, bounds[1:]):
        decodes = max(0, min(end, shape.decodes) - start)
        prefill = (end - start) - decodes
        prefix = shape.prefix + max(0, start - shape.decodes) if prefill else 0
        found.append(StepShape(decodes, shape.context if decodes else 0, prefill, prefix))
    return found


@dataclass(frozen=True)
class Prediction:
    """A candidate's predicted step: the GPU's makespan, the host's issue time, and the step time (the longer of
    the two, times the mode's calibration; `raw_ms` without it); `busy`: each unit's predicted busy ms;
    `overlap_ms`: how long both units are predicted to run at once (kernels timed alone: no interference)."""

    gpu_ms: float
    host_ms: float
    raw_ms: float
    ms: float
    busy: tuple[tuple[str, float], ...] = ()
    overlap_ms: float = 0.0


@dataclass
class CostTable:
    """Measured times (see the module docstring). Plain data: `to_json` / `from_json`."""

    key: str
    kinds: tuple[tuple[str, str, bool, tuple[str, ...]], ...]  # the program's `schedule_key`
    sms: int  # the device's SM count
    pieces: dict[str, dict[str, float]] = field(default_factory=dict)  # shape_key -> piece -> ms
    carveout: dict[int, float] = field(default_factory=dict)
    decode: dict[str, float] = field(default_factory=dict)  # decode_key -> ms (one layer's call)
    decode_ref: tuple[int, int] = (0, 0)
    host_ms: dict[str, float] = field(default_factory=dict)  # shape_key -> ms
    host_split_ms: dict[str, float] = field(default_factory=dict)  # shape_key -> ms, cut in two on one stream
    calibration: dict[str, float] = field(default_factory=dict)  # "mode|shape_key" -> measured / predicted

    # -- prediction ---------------------------------------------------------------------------------------------
    def missing(self, shape: StepShape, candidate: Candidate) -> list[StepShape]:
        """The nano-batch shapes `candidate` needs whose pieces are not measured yet."""
        needed = [shape, *subshapes(shape, candidate), *subshapes(shape, candidate, attention=True)]
        return self._unmeasured(needed)

    def _unmeasured(self, shapes: Sequence[StepShape]) -> list[StepShape]:
        return [s for s in dict.fromkeys(shapes) if shape_key(s) not in self.pieces]

    def predict(self, shape: StepShape, candidate: Candidate) -> Prediction | None:
        """The predicted step of `shape` cut like `candidate`; None when a time it needs is not in the table."""
        parts, attention_parts = subshapes(shape, candidate), subshapes(shape, candidate, attention=True)
        if self._unmeasured([shape, *parts, *attention_parts]) or shape_key(shape) not in self.host_ms:
            return None
        whole = self.pieces[shape_key(shape)]
        # the host issues each dense piece once per dense nano-batch and each call once per attention nano-batch
        host = self.host_for(shape, (len(parts) + len(attention_parts)) / 2)
        if candidate.unsplit:
            gpu = sum(whole.values())
            busy: tuple[tuple[str, float], ...] = (("compute", gpu),)
            overlap = 0.0
        elif candidate.units == "hard-triton":  # (no times of the persistent GEMM on partitions in the table)
            return None
        else:
            partitioned = candidate.units in ("soft", "carveout", "hard")
            carve = self.carveout.get(candidate.memory_sms) if candidate.units in ("carveout", "hard") else 1.0
            if carve is None:
                return None
            attention = {name for name, kind, _, _ in self.kinds if kind == "attention"}
            whole_pieces = {name for name, _, is_whole, _ in self.kinds if is_whole}
            costs: dict[tuple[str, int], float] = {}
            for name, _, _, _ in self.kinds:
                for i, part in enumerate(attention_parts if name in attention else parts):
                    if name in whole_pieces:
                        costs[(name, i)] = whole.get(name, 0.0)
                        continue
                    ms = self.pieces[shape_key(part)].get(name, 0.0)
                    if name in attention and partitioned:
                        ms = self._attention_on(part, ms, candidate.memory_sms, candidate.decode)
                        if ms is None:
                            return None
                    elif name not in attention:
                        ms *= carve
                    costs[(name, i)] = ms
            bounds = candidate.boundaries(shape.tokens, shape.decodes) or (0, shape.tokens)
            schedule = schedule_of(self.kinds, bounds, candidate.units == "off",
                                   candidate.attention_boundaries(shape.tokens, shape.decodes))  # (as subshapes cut)
            timeline = simulate(schedule, lambda op: _cost_us(costs, op))
            gpu = timeline.makespan_us / 1e3
            busy = tuple((unit, sum(slot.end_us - slot.start_us for slot in slots) / 1e3)
                         for unit, slots in timeline.rows)
            overlap = timeline.concurrent_us("compute", "memory") / 1e3
        raw = max(gpu, host)
        return Prediction(gpu, host, raw, raw * self.factor(shape, mode_of(candidate)), busy, overlap)

    def host_for(self, shape: StepShape, nanobatches: float) -> float:
        """The host's ms to issue `shape` as `nanobatches` nano-batches (see the module docstring)."""
        whole = self.host_ms[shape_key(shape)]
        split = self.host_split_ms.get(shape_key(shape))
        if split is None:
            return whole * nanobatches
        return whole + (nanobatches - 1) * max(0.0, split - whole)

    def _attention_on(self, part: StepShape, whole_ms: float, sms: int, kernel: DecodeKernel | None) -> float | None:
        """A nano-batch's attention call on a partition of `sms` SMs (see the module docstring's assumptions)."""
        decodes, context = self.decode_ref
        if not part.decodes:
            return whole_ms * self.sms / sms
        on_gpu, on_share = self.decode.get(decode_key(0, None)), self.decode.get(decode_key(sms, kernel))
        if on_gpu is None or on_share is None or not decodes:
            return None
        scale = part.decodes * part.context / (decodes * context)
        prefill = max(0.0, whole_ms - on_gpu * scale)
        return on_share * scale + prefill * self.sms / sms

    # -- calibration --------------------------------------------------------------------------------------------
    def calibrate(self, shape: StepShape, replayed: Mapping[Candidate, tuple[float, Prediction]]) -> None:
        """Per unit mode, measured / predicted on `shape` (median over the candidates of that mode in `replayed`:
        measured ms and the prediction made before the replay) replaces the factor of (mode, shape)."""
        ratios: dict[str, list[float]] = {}
        for candidate, (measured, predicted) in replayed.items():
            if predicted.raw_ms > 0:
                ratios.setdefault(mode_of(candidate), []).append(measured / predicted.raw_ms)
        for mode, values in ratios.items():
            self.calibration[f"{mode}|{shape_key(shape)}"] = statistics.median(values)

    def factor(self, shape: StepShape, mode: str) -> float:
        """The calibration of `mode` on `shape`; for a shape not replayed, the median over the shapes that were."""
        own = self.calibration.get(f"{mode}|{shape_key(shape)}")
        if own is not None:
            return own
        others = [v for k, v in self.calibration.items() if k.split("|", 1)[0] == mode]
        return statistics.median(others) if others else 1.0

    def calibrated(self, shape: StepShape) -> tuple[str, ...]:
        """The unit modes whose predictions were measured on `shape`."""
        suffix = f"|{shape_key(shape)}"
        return tuple(k[: -len(suffix)] for k in self.calibration if k.endswith(suffix))

    # -- storage ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "kinds": [list(k[:3]) + [list(k[3])] for k in self.kinds],
                "sms": self.sms, "pieces": self.pieces, "carveout": {str(k): v for k, v in self.carveout.items()},
                "decode": self.decode, "decode_ref": list(self.decode_ref), "host_ms": self.host_ms,
                "host_split_ms": self.host_split_ms, "calibration": self.calibration}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"cost table format {data.get('format')!r}, expected {FORMAT}")
        kinds = tuple((str(n), str(k), bool(w), tuple(str(d) for d in deps)) for n, k, w, deps in data["kinds"])
        return cls(str(data["key"]), kinds, int(data["sms"]),
                   {s: {p: float(ms) for p, ms in v.items()} for s, v in data["pieces"].items()},
                   {int(k): float(v) for k, v in data["carveout"].items()},
                   {k: float(v) for k, v in data["decode"].items()},
                   (int(data["decode_ref"][0]), int(data["decode_ref"][1])),
                   {k: float(v) for k, v in data["host_ms"].items()},
                   {k: float(v) for k, v in data.get("host_split_ms", {}).items()},  # (absent in older tables)
                   {k: float(v) for k, v in data["calibration"].items()})


def _cost_us(costs: Mapping[tuple[str, int], float], op: NanoOp) -> float:
    return costs.get((op.group, op.nanobatch), 0.0) * 1e3


# -- disk ---------------------------------------------------------------------------------------------------------
def table_key(parts: Mapping[str, Any]) -> str:
    """A short stable key for what a table's times depend on (`parts`: JSON-able)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_table(directory: str, key: str) -> CostTable | None:
    """The table kept under `key` in `directory`, or None (none kept, or unreadable: measured again)."""
    try:
        with open(os.path.join(directory, f"{key}.json")) as f:
            table = CostTable.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return table if table.key == key else None


def save_table(directory: str, table: CostTable) -> None:
    """Write `table` atomically (a reader never sees half a file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{table.key}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table.to_json(), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# -- measurement (on the device) ----------------------------------------------------------------------------------
def measure_shape(runtime: Any, vocab_size: int, shape: StepShape, reps: int = 3) -> tuple[dict[str, float], float]:
    """Each piece's ms on a whole eager step of `shape` (median over `reps`), and the host's ms to issue the step
    (`_issue_behind_sleep`; the fastest of `reps`: the host's noise only ever adds).
    On CUDA a sleep kernel queued first lets the host issue the whole step before the GPU reaches it, so the
    events between pieces time the GPU's work alone."""
    from nanoflow_fx.runtime.program_runner import PieceTimer

    samples: dict[str, list[float]] = {}
    host = []
    with _requests(runtime, vocab_size, shape, None) as step:
        step()
        for _ in range(reps):
            timer = PieceTimer(runtime.device.type == "cuda")
            host.append(_issue_behind_sleep(runtime, functools.partial(step, timer)))
            times = timer.piece_ms()
            for name, ms in times.items():
                samples.setdefault(name, []).append(ms)
    return {name: statistics.median(v) for name, v in samples.items()}, min(host)


def measure_split_host(runtime: Any, vocab_size: int, shape: StepShape, reps: int = 3) -> float:
    """The host's ms to issue `shape`'s step cut in two halves on one stream (`host_split_ms`; the fastest of
    `reps` after one warm-up, as `measure_shape` times the unsplit step's)."""
    from nanoflow_fx.cost.search import policy_for

    with _requests(runtime, vocab_size, shape, policy_for(Candidate((0.5,)), make_units)) as step:
        step()
        return min(_issue_behind_sleep(runtime, step) for _ in range(reps))


@contextmanager
def _requests(runtime: Any, vocab_size: int, shape: StepShape, policy: Any) -> Iterator[Callable[..., Any]]:
    """`shape`'s requests on `runtime`'s cache (`cost.profile.StepHarness`); yields what runs one eager step of
    them cut by `policy` (a split policy; None: whole), given an optional piece timer. The pages are given back
    after."""
    from nanoflow_fx.cost.profile import StepHarness

    runner = runtime.runner
    harness = StepHarness(runtime, shape, vocab_size)
    try:
        yield lambda timer=None: runner.run_eager(harness.chunks, split=policy, timer=timer)
    finally:
        harness.release()


def _issue_behind_sleep(runtime: Any, step: Any) -> float:
    """ms the host takes to issue `step()` (`cost.profile.issue_ms`: planners' waits excluded); on CUDA with a
    sleep kernel queued first (~50 ms at 2 GHz: longer than the host takes to issue a step), so that the GPU's
    work never holds the host up."""
    import torch

    from nanoflow_fx.cost.profile import issue_ms

    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
    return issue_ms(runtime.runner, step)


def measure_carveout(runtime: Any, vocab_size: int, shape: StepShape, shares: Sequence[int],
                     pieces: Mapping[str, float], reps: int = 3) -> dict[int, float]:
    """Per SM share k: the dense pieces' ms on a whole step of `shape` with the GEMMs' carve-out of k SMs, over
    `pieces` (the same without it)."""
    from nanoflow_fx.runtime.program_runner import sm_carveout

    program = runtime.step_fn.program
    dense = {p.name for p in program.pieces if p.kind == "dense"}
    base = sum(ms for name, ms in pieces.items() if name in dense)
    factors = {}
    for k in shares:
        with sm_carveout(k):
            times, _ = measure_shape(runtime, vocab_size, shape, reps)
        factors[k] = sum(ms for name, ms in times.items() if name in dense) / base if base > 0 else 1.0
    return factors

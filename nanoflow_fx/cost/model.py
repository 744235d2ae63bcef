"""The cost model, pure: step shapes, candidate cuts, what the cost table predicts for them, and the search's picks.

Nothing here runs on the device: plain data, arithmetic and Schedule simulation (`Cut` and `schedule_of` are
`runtime.program_runner`'s plain data and Schedule builder), so all of it is tested on the CPU with synthetic
timings. The times come from `cost.measure`, which imports this module (never the other way round);
`cost.autotune` runs both inside `optimize()`.

The search. Candidates are cuts of a step (`Candidate`: cut fractions of its tokens, optionally aligned to the end
of its decode rows, and the units: one stream, plain streams, a green-context partition of k SMs for attention
with or without the GEMMs' cuBLASLt carve-out, or a hard partition). The unsplit step is always a candidate.
`replay_order` names the candidates worth replaying from their predicted times; `search_shape` replays them (given
how: `cost.measure.tune` replays each on the device) and calibrates the table with them; `pick` keeps the fastest,
falling back to the unsplit step unless a cut wins by more than `margin` (so the result is never slower than one
nano-batch beyond noise). `TunedPolicy` then cuts each step like the tuned shape nearest to it (by share of decode
tokens and token count); decode-only steps always run whole (each nano-batch would read every weight again; their
CUDA graphs are unsplit). `best_decode_kernels` picks the memory unit's decode kernel per SM share from their
timings (`DecodeTiming`).

The cost table. `CostTable` is measured on the device when `num_nanobatches="auto"` tunes (`cost.measure`:
`measure_shape`, `measure_split_host`, `measure_carveout`, `decode_kernel_timings`) and kept on disk (`load_table`
/ `save_table`, keyed by `table_key`: the model's configuration and dtype, the lowering, the device and the library
versions). It holds:

- `pieces`: each piece of the step program (a dense piece: a layer's GEMMs with the code Inductor fused around
  them; an attention call) timed on a whole step of one nano-batch's shape (its decode rows at the tuned context,
  its prefill tokens), on the whole GPU: CUDA events between the pieces (`program_runner.PieceTimer`), the step
  queued behind a sleep kernel so that the host's issue time does not show;
- `carveout`: per SM share k, the dense pieces' time with the GEMMs' cuBLASLt carve-out of k SMs over their time
  without it;
- `decode`: the decode rows' attention per SM share and kernel, for `decode_ref` = (decodes, context);
- `host_ms`: the host's time to issue each tuned shape's unsplit step, and `host_split_ms` the same step cut in
  two halves on one stream: what one more nano-batch costs the host (less than as much again: measured in
  benchmarks/RESULTS.md);
- `all_reduce`: under tensor parallelism, an all-reduce's time over the TP group per message size
  (`cost.measure.measure_all_reduce`); `collective_ms` interpolates it for any message, so a TP step's
  collectives are priced (`CostTable.all_reduce_ms`, `all_reduce_bytes`);
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
makespan and the host's issue time, times the calibration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.program_runner import Cut, Units, schedule_of
from nanoflow_fx.schedule import NanoOp, simulate

__all__ = ["UNSPLIT", "Candidate", "CostTable", "DecodeTiming", "Prediction", "StepShape", "TunedPolicy", "Tuning",
           "all_reduce_bytes", "best_decode_kernels", "bus_bandwidth_gbps", "candidates", "collective_ms", "decode_key",
           "load_table", "mode_of", "pick", "policy_for", "replay_order", "save_table", "search_shape", "shape_key",
           "subshapes", "table_key"]


# -- step shapes and candidates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """A dense step: `decodes` one-token requests at context `context`, then `prefill` tokens of one chunk whose
    request has `prefix` tokens cached before it (a later piece of a chunk cut into nano-batches)."""

    decodes: int
    context: int
    prefill: int
    prefix: int = 0

    @property
    def tokens(self) -> int:
        return self.decodes + self.prefill

    @property
    def decode_share(self) -> float:
        return self.decodes / self.tokens


@dataclass(frozen=True)
class Candidate:
    """A cut: `fractions` of the step's tokens where nano-batches end (() = unsplit); with `at_decodes` the first
    boundary is the end of the decode rows instead (one nano-batch of decodes, one of prefill); `units` is an
    `ExperimentalConfig.sm_partition` mode and `memory_sms` its partition size; `decode` the kernel the memory unit
    attends decode rows with (None: the step backend's own); `attention`: fractions where the attention calls'
    nano-batches end, when they are cut apart from the dense pieces (NanoFlow's uneven splits; () = the same)."""

    fractions: tuple[float, ...] = ()
    at_decodes: bool = False
    units: str = "off"
    memory_sms: int = 0
    decode: DecodeKernel | None = None
    attention: tuple[float, ...] = ()

    @property
    def unsplit(self) -> bool:
        return not self.fractions and not self.at_decodes and not self.attention

    def boundaries(self, tokens: int, decodes: int) -> tuple[int, ...] | None:
        """The dense pieces' boundaries (None: not cut)."""
        if not self.fractions and not self.at_decodes:
            return None
        cuts = [decodes] if self.at_decodes else [round(f * tokens) for f in self.fractions]
        return _bounds(cuts, tokens)

    def attention_boundaries(self, tokens: int, decodes: int) -> tuple[int, ...] | None:
        """The attention calls' boundaries when they differ from the dense pieces' (None: the same)."""
        if not self.attention:
            return None
        cut = _bounds([round(f * tokens) for f in self.attention], tokens) or (0, tokens)
        return None if cut == (self.boundaries(tokens, decodes) or (0, tokens)) else cut

    def cuts(self, tokens: int, decodes: int) -> bool:
        """Whether a step of `tokens` tokens (`decodes` of them decode rows) is cut at all: its dense pieces or its
        attention calls (a cut at the decode rows of a decode-only step cuts nothing)."""
        return self.boundaries(tokens, decodes) is not None or self.attention_boundaries(tokens, decodes) is not None

    def label(self) -> str:
        if self.unsplit:
            return "unsplit"
        split = "decodes|prefill" if self.at_decodes else "/".join(f"{f:g}" for f in self.fractions) or "whole"
        if self.attention:
            split += " attn " + "/".join(f"{f:g}" for f in self.attention)
        units = self.units if self.units in ("off", "streams") else f"{self.units}{self.memory_sms}"
        return f"{split} {units}" + (f" [{self.decode.label()}]" if self.decode is not None else "")


def _bounds(cuts: Sequence[int], tokens: int) -> tuple[int, ...] | None:
    inner = sorted({c for c in cuts if 0 < c < tokens})
    return (0, *inner, tokens) if inner else None


UNSPLIT = Candidate()


def candidates(shares: Sequence[int] = (16, 24, 32, 48), fractions: Sequence[float] = (0.25, 0.5, 0.75),
               modes: Sequence[str] = ("streams", "soft", "carveout"),
               decode: Mapping[int, DecodeKernel | None] | None = None,
               cuts: Sequence[tuple[float, ...]] = (),
               uneven: Sequence[tuple[tuple[float, ...], tuple[float, ...]]] = ()) -> list[Candidate]:
    """The search space: unsplit; two nano-batches cut at each fraction or at the decode rows, more cut at each
    tuple of `cuts`, and the dense pieces and the attention calls cut apart at each pair of `uneven` (e.g.
    NanoFlow's ((0.5,), (0.25, 0.5, 0.75)): GEMMs in 2, attention in 4), on each unit mode ("soft"/"carveout"/
    "hard" at each SM share). `decode`: per SM share, a kernel measured to attend decode rows faster than the
    step backend's own on that partition (`best_decode_kernels`): partitioned candidates of that
    share are tried with it as well."""
    found = [UNSPLIT]
    every = ([((f,), False, ()) for f in fractions] + [((), True, ())] + [(tuple(c), False, ()) for c in cuts]
             + [(tuple(d), False, tuple(a)) for d, a in uneven])
    for frac, at_decodes, attention in every:
        found.append(Candidate(frac, at_decodes, "off", attention=attention))
        for mode in modes:
            if mode == "streams":
                found.append(Candidate(frac, at_decodes, "streams", attention=attention))
                continue
            for k in shares:
                found.append(Candidate(frac, at_decodes, mode, k, attention=attention))
                kernel = (decode or {}).get(k)
                if kernel is not None:
                    found.append(Candidate(frac, at_decodes, mode, k, kernel, attention))
    return found


# -- the search's choices ---------------------------------------------------------------------------------------------
def pick(measured: Mapping[Candidate, float], margin: float = 0.01) -> Candidate:
    """The fastest candidate, unless it beats the unsplit step by no more than `margin` (then unsplit).
    Deterministic: ties go to the candidate listed first."""
    if UNSPLIT not in measured:
        raise ValueError("the unsplit step must be among the measured candidates")
    best = min(measured, key=lambda c: measured[c])
    return best if measured[best] < measured[UNSPLIT] * (1 - margin) else UNSPLIT


def replay_order(predicted: Mapping[Candidate, float], top: int, calibrated: Sequence[str] = (),
                 within: float = 1.03) -> list[Candidate]:
    """Which candidates the search replays, from their predicted ms: the unsplit step, the `top` fastest
    predicted cuts, and the fastest predicted cut of each unit mode not in `calibrated` (so that every mode's
    prediction gets measured against a real step once). A cut of a calibrated mode (its predictions on this
    shape already corrected by a replay, and the unsplit step's too) is replayed only if predicted within
    `within` of the unsplit step: once the table knows a shape, cuts it expects to lose cost no replays.
    Deterministic: ties go to the candidate listed first."""
    bound = predicted[UNSPLIT] * within if UNSPLIT in predicted and "unsplit" in calibrated else float("inf")
    ranked = sorted((c for c in predicted if not c.unsplit and (c.units not in calibrated or predicted[c] <= bound)),
                    key=lambda c: predicted[c])
    chosen = [UNSPLIT, *ranked[:top]]
    for candidate in ranked:
        mode = candidate.units
        if mode not in calibrated and all(c.unsplit or c.units != mode for c in chosen):
            chosen.append(candidate)
    return chosen


def search_shape(space: Sequence[Candidate], replay: Callable[[Candidate], float], table: Any = None,
                 predictions: Mapping[Candidate, Any] | None = None, top: int = 4,
                 shape: StepShape | None = None) -> dict[Candidate, float]:
    """One shape's search, given how to replay a candidate (ms): every candidate of `space`, or, with a cost table,
    `shape` and its `predictions` (`Prediction` per candidate), those `replay_order` names; the
    table is then calibrated with them. A candidate whose replay raises (a unit mode this device cannot run) is
    skipped; the unsplit step's may not. Returns ms per replayed candidate (`pick` chooses from it)."""
    order = list(space)
    calibrate = table is not None and predictions is not None and shape is not None
    if calibrate:
        assert predictions is not None
        order = replay_order({c: p.ms for c, p in predictions.items()}, top, table.calibrated(shape))
    measured: dict[Candidate, float] = {}
    for candidate in order:
        try:
            measured[candidate] = replay(candidate)
        except Exception:  # noqa: BLE001 - a unit mode this device cannot run: not a candidate here
            if candidate.unsplit:
                raise
    if calibrate:
        assert predictions is not None
        table.calibrate(shape, {c: (ms, predictions[c]) for c, ms in measured.items() if c in predictions})
    return measured


@dataclass(frozen=True)
class Tuning:
    """What the search did on one step shape: ms per replayed candidate, the pick, how long it took, and (with a
    cost table) the predicted ms of every candidate it ranked, before the replays calibrated the table."""

    shape: StepShape
    measured: tuple[tuple[Candidate, float], ...]
    chosen: Candidate
    seconds: float
    predicted: tuple[tuple[Candidate, float], ...] = ()


class TunedPolicy:
    """A split policy (`StepRunner.split_policy`) from tuned shapes: each step is cut like the tuned shape nearest
    to it (`policy_for` its candidate; `make_units(mode, sms)` builds each candidate's execution units once)."""

    def __init__(self, chosen: Mapping[StepShape, Candidate],
                 make_units: Callable[[str, int], Units | None]) -> None:
        self.chosen = dict(chosen)
        self._policies = {shape: policy_for(c, make_units) for shape, c in self.chosen.items()}

    def nearest(self, tokens: int, decodes: int) -> StepShape | None:
        """The tuned shape a step is cut like; None for decode-only steps (and padding), which run whole."""
        if not self.chosen or decodes >= tokens - 1:
            return None
        share = decodes / tokens
        return min(self.chosen, key=lambda s: (abs(s.decode_share - share) + abs(s.tokens - tokens) / max(tokens, 1),
                                               s.tokens, s.decodes))

    def __call__(self, tokens: int, decodes: int) -> Cut | None:
        shape = self.nearest(tokens, decodes)
        return None if shape is None else self._policies[shape](tokens, decodes)


def policy_for(candidate: Candidate,
               make_units: Callable[[str, int], Units | None]) -> Callable[[int, int], Cut | None]:
    """A split policy that cuts every step like `candidate` (what the search replays)."""
    units = None if candidate.unsplit else make_units(candidate.units, candidate.memory_sms)
    if units is not None and candidate.decode is not None:
        units = dataclasses.replace(units, decode=candidate.decode)

    def policy(tokens: int, decodes: int) -> Cut | None:
        if not candidate.cuts(tokens, decodes):
            return None
        return Cut(candidate.boundaries(tokens, decodes) or (0, tokens), units,
                   candidate.attention_boundaries(tokens, decodes))

    return policy


@dataclass(frozen=True)
class DecodeTiming:
    """One decode-attention kernel timed on one SM partition: ms per call, and the KV bytes it read per second."""

    sms: int
    kernel: DecodeKernel | None  # None: the step backend's own decode kernel
    ms: float
    tb_s: float


def best_decode_kernels(timings: Sequence[DecodeTiming]) -> Mapping[int, DecodeKernel | None]:
    """Per SM share, the fastest kernel of `timings` (None where the step backend's own is fastest)."""
    best: dict[int, DecodeTiming] = {}
    for t in timings:
        if t.sms not in best or t.ms < best[t.sms].ms:
            best[t.sms] = t
    return {sms: t.kernel for sms, t in best.items()}


# -- the cost table ---------------------------------------------------------------------------------------------------
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
    all_reduce: dict[int, float] = field(default_factory=dict)  # message bytes -> ms (tensor parallelism)

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
            dense = {name for name, kind, _, _ in self.kinds if kind == "dense"}  # (the GEMMs a carve-out slows)
            whole_pieces = {name for name, _, is_whole, _ in self.kinds if is_whole}
            costs: dict[tuple[str, int], float] = {}
            for name, _, _, _ in self.kinds:
                for i, part in enumerate(attention_parts if name in attention else parts):
                    if name in whole_pieces:
                        costs[(name, i)] = whole.get(name, 0.0)
                        continue
                    ms = self.pieces[shape_key(part)].get(name, 0.0)
                    if name in attention and partitioned:
                        on_partition = self._attention_on(part, ms, candidate.memory_sms, candidate.decode)
                        if on_partition is None:
                            return None
                        ms = on_partition
                    elif name in dense:
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

    def all_reduce_ms(self, nbytes: int, count: int = 1) -> float:
        """`count` all-reduces of `nbytes` each over the TP group, from the measured `all_reduce` times
        (`collective_ms`); ValueError if none were measured."""
        return count * collective_ms(self.all_reduce, nbytes)

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
                "host_split_ms": self.host_split_ms, "calibration": self.calibration,
                "all_reduce": {str(k): v for k, v in self.all_reduce.items()}}

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
                   {k: float(v) for k, v in data["calibration"].items()},
                   {int(k): float(v) for k, v in data.get("all_reduce", {}).items()})  # (absent in older tables)


def _cost_us(costs: Mapping[tuple[str, int], float], op: NanoOp) -> float:
    return costs.get((op.group, op.nanobatch), 0.0) * 1e3


# -- collectives (tensor parallelism) ----------------------------------------------------------------------------------
def collective_ms(times: Mapping[int, float], nbytes: int) -> float:
    """A collective's ms on a message of `nbytes`, from `times` measured per message size (bytes -> ms;
    `cost.measure.measure_all_reduce`): linear between the two measured sizes around it (a collective's time is
    a latency plus bytes over a bandwidth, piecewise); below the smallest size its time (the latency floor); above
    the largest, the last two sizes' slope extended (bandwidth-bound). One size measured: its time, scaled by
    bytes above it."""
    if nbytes < 0:
        raise ValueError(f"message size {nbytes} bytes is negative")
    if not times:
        raise ValueError("no collective timings: measure them first (cost.measure.measure_all_reduce)")
    if any(size <= 0 or ms < 0 for size, ms in times.items()):
        raise ValueError(f"collective timings need positive sizes and non-negative times, got {dict(times)}")
    sizes = sorted(times)
    if nbytes <= sizes[0]:
        return times[sizes[0]]
    if len(sizes) == 1:
        return times[sizes[0]] * nbytes / sizes[0]
    pairs = list(zip(sizes, sizes[1:]))
    lo, hi = next(((a, b) for a, b in pairs if nbytes <= b), pairs[-1])
    return times[lo] + (times[hi] - times[lo]) * (nbytes - lo) / (hi - lo)


def bus_bandwidth_gbps(nbytes: int, ms: float, world_size: int) -> float:
    """An all-reduce's bus bandwidth in GB/s (nccl-tests' definition: the algorithm bandwidth, bytes / time, times
    2 (n - 1) / n, what each link carries in a ring), comparable across world sizes."""
    if ms <= 0 or world_size < 1:
        raise ValueError(f"bus bandwidth needs a positive time and world size, got {ms} ms on {world_size} ranks")
    return nbytes / (ms * 1e-3) * 2 * (world_size - 1) / world_size / 1e9


def all_reduce_bytes(tokens: int, hidden_size: int, itemsize: int) -> int:
    """The message of one of a TP step's all-reduces (after o_proj, after down_proj, the vocabulary-parallel
    embedding): the step's token rows of the hidden state."""
    return tokens * hidden_size * itemsize


# -- disk -------------------------------------------------------------------------------------------------------------
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

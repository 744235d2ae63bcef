"""The schedule search: which cut (nano-batch boundaries and execution units) each dense step shape runs with.

Candidates are cuts of a step (`Candidate`: cut fractions of its tokens, optionally aligned to the end of its
decode rows, and the units: one stream, plain streams, a green-context partition of k SMs for attention with or
without the GEMMs' cuBLASLt carve-out, or a hard partition). The unsplit step is always a candidate. Every
candidate is replayed for real on the device (`tune`, on a `cost.profile.StepHarness`) over the step shapes the
engine runs, and `pick` keeps the fastest, falling back to the unsplit step unless a cut wins by more than
`margin` (so the result is never slower than one nano-batch beyond noise). `TunedPolicy` then cuts each step
like the tuned shape nearest to it (by share of decode tokens and token count); decode-only steps always run
whole (each nano-batch would read every weight again; their CUDA graphs are unsplit).

Pure given the measurements (`pick`, `TunedPolicy`), so it is tested on the CPU with synthetic timings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.program_runner import Cut, Units

log = logging.getLogger(__name__)

__all__ = ["Candidate", "StepShape", "TunedPolicy", "Tuning", "candidates", "pick", "policy_for", "predict_candidates",
           "replay_order", "search_shape", "tune"]


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
    `NanoFlowConfig.sm_partition` mode and `memory_sms` its partition size; `decode` the kernel the memory unit
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
    step backend's own on that partition (`cost.profile.best_decode_kernels`): partitioned candidates of that
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


def pick(measured: Mapping[Candidate, float], margin: float = 0.01) -> Candidate:
    """The fastest candidate, unless it beats the unsplit step by no more than `margin` (then unsplit).
    Deterministic: ties go to the candidate listed first."""
    if UNSPLIT not in measured:
        raise ValueError("the unsplit step must be among the measured candidates")
    best = min(measured, key=lambda c: measured[c])
    return best if measured[best] < measured[UNSPLIT] * (1 - margin) else UNSPLIT


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
class Tuning:
    """What the search did on one step shape: ms per replayed candidate, the pick, how long it took, and (with a
    cost table) the predicted ms of every candidate it ranked, before the replays calibrated the table."""

    shape: StepShape
    measured: tuple[tuple[Candidate, float], ...]
    chosen: Candidate
    seconds: float
    predicted: tuple[tuple[Candidate, float], ...] = ()


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


def tune(runtime: Any, vocab_size: int, shapes: Sequence[StepShape], space: Sequence[Candidate],
         make_units: Callable[[str, int], Units | None], reps: int = 4, rounds: int = 2, table: Any = None,
         top: int = 4) -> list[Tuning]:
    """Replay candidates of `space` on each shape that fits the runtime's cache (CUDA) and pick per shape. Without
    `table` every candidate is replayed; with a `cost.tables.CostTable`, the pieces of each nano-batch shape the
    candidates cut are measured (those the table lacks), every candidate is predicted, the ones `replay_order`
    names are replayed, and the table is calibrated with them. A candidate the device cannot run (e.g. a
    partition it cannot make) is skipped."""
    import time

    from nanoflow_fx.cost.profile import StepHarness

    found = []
    for shape in shapes:
        if not StepHarness.fits(runtime, shape):
            continue
        start = time.perf_counter()
        runnable = [c for c in space if c.unsplit or c.cuts(shape.tokens, shape.decodes)]
        predictions = predict_candidates(runtime, vocab_size, table, shape, runnable) if table is not None else None
        harness = StepHarness(runtime, shape, vocab_size)
        try:
            measured = search_shape(runnable, lambda c, h=harness: h.time(policy_for(c, make_units), reps, rounds),
                                    table, predictions, top, shape)
        finally:
            harness.release()
        found.append(Tuning(shape, tuple(measured.items()), pick(measured), time.perf_counter() - start,
                            tuple((c, p.ms) for c, p in (predictions or {}).items())))
    return found


def search_shape(space: Sequence[Candidate], replay: Callable[[Candidate], float], table: Any = None,
                 predictions: Mapping[Candidate, Any] | None = None, top: int = 4,
                 shape: StepShape | None = None) -> dict[Candidate, float]:
    """One shape's search, given how to replay a candidate (ms): every candidate of `space`, or, with a cost table,
    `shape` and its `predictions` (`cost.tables.Prediction` per candidate), those `replay_order` names; the
    table is then calibrated with them. A candidate whose replay raises (a unit mode this device cannot run) is
    skipped; the unsplit step's may not. Returns ms per replayed candidate (`pick` chooses from it)."""
    order = list(space)
    calibrate = table is not None and predictions is not None and shape is not None
    if calibrate:
        order = replay_order({c: p.ms for c, p in predictions.items()}, top, table.calibrated(shape))
    measured: dict[Candidate, float] = {}
    for candidate in order:
        try:
            measured[candidate] = replay(candidate)
        except Exception:  # noqa: BLE001 - a unit mode this device cannot run: not a candidate here
            if candidate.unsplit:
                raise
    if calibrate:
        table.calibrate(shape, {c: (ms, predictions[c]) for c, ms in measured.items() if c in predictions})
    return measured


def predict_candidates(runtime: Any, vocab_size: int, table: Any, shape: StepShape,
                       space: Sequence[Candidate]) -> dict[Candidate, Any]:
    """Every candidate's prediction, after measuring the nano-batch shapes the table lacks (and the shape's own
    host time, unsplit and cut in two). Candidates the table cannot price (e.g. a share without decode timings)
    are left out."""
    from nanoflow_fx.cost.profile import StepHarness
    from nanoflow_fx.cost.tables import measure_shape, measure_split_host, shape_key

    needed = {shape_key(s): s for c in space for s in table.missing(shape, c)}
    if shape_key(shape) not in table.host_ms:
        needed[shape_key(shape)] = shape
    for key, part in needed.items():
        if not StepHarness.fits(runtime, part):
            continue
        try:
            table.pieces[key], host_ms = measure_shape(runtime, vocab_size, part)
        except Exception as err:  # noqa: BLE001 - the candidates that need it stay unpriced (and are not replayed)
            log.warning("nanoflow_fx: timing the pieces of %s failed (%s: %s)", part, type(err).__name__, err)
            continue
        if part == shape:
            table.host_ms[key] = host_ms
    if shape_key(shape) not in table.host_split_ms and shape.tokens > 1 and StepHarness.fits(runtime, shape):
        try:
            table.host_split_ms[shape_key(shape)] = measure_split_host(runtime, vocab_size, shape)
        except Exception as err:  # noqa: BLE001 - the host cost of more nano-batches is then assumed (tables.py)
            log.warning("nanoflow_fx: timing the host's issue of %s cut in two failed (%s: %s)", shape,
                        type(err).__name__, err)
    found = {}
    for candidate in space:
        prediction = table.predict(shape, candidate)
        if prediction is not None:
            found[candidate] = prediction
    return found

"""`ProgramRunner`: runs a `StepProgram` whole, or as nano-batches on execution units (streams, SM partitions).

A step arrives as the captured graph's flat inputs. Without a `NanobatchStep` record (decode steps, CUDA-graph
replays, any step the split policy keeps whole) the pieces run in order and each attention call is the
captured `nanoflow::paged_attention` op, planned by the step runner: the unsplit path, exactly as captured.

With a record, the step's tokens are cut at `record.boundaries` and the program runs by a Schedule
(`program_schedule`): dense pieces on the "compute" unit, attention on the "memory" unit, each nano-batch's
attention under the other nano-batch's dense work (NanoFlow's ping-pong), cross-unit waits as CUDA events
(`runtime.streams.stream_actions`). Under tensor parallelism the all-reduces (collective pieces) go on a "network"
unit of their own, a stream that NCCL's kernels use while the compute unit runs the next nano-batch's GEMMs
(NanoFlow's network overlap); every rank issues them in the same order. Each attention copy reads its own metadata
and backend plan from the record:
nothing global. Dense pieces run on token slices (views; token-parallel, so slice in = slice out); a piece
marked whole sees the joined nano-batches. KV writes go to the same cache through each nano-batch's slice of
the slot mapping; a request cut by a boundary has its later part read KV the earlier part wrote, so the copies
of one layer's attention run in order on the memory unit.

SM partitions (NanoFlow's execution units): the memory unit's stream may be a green-context stream confined
to k SMs (`green_context.split_sms`), and the compute unit's GEMMs may leave k SMs free through cuBLASLt's SM
carve-out. The carve-out is process-wide state read when a cuBLASLt matmul is launched (torch routes plain
matmuls to cuBLASLt only when it is the preferred BLAS library), so the runner sets both for the launches of a
nano-batched step and restores them before returning: no other step, and no other user of the process, sees
them. Under CUDA-graph capture the value at capture time is baked into each GEMM node; nano-batched steps
are not captured (dense steps of hundreds of tokens hide their launch cost behind the GPU's work).

What the partitions cost (docs/findings.md): a GEMM confined to the other units' SMs (carve-out, or the
persistent Triton GEMM of "hard-triton") keeps about its share of the SMs' work, and the decode attention on a
partition keeps more than its share of its whole-GPU rate. But co-running units share one power budget, which
the GEMMs alone already fill: the clock drops and each unit slows by about as much, so the units together do at
most a little more work than run one after the other (the most with the attention on a partition beside cuBLAS on
the whole GPU, "soft"; disjoint partitions do less), and cutting a step costs its GEMMs most of that gain.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from nanoflow_fx.capture.program import Piece, StepProgram
from nanoflow_fx.context import current
from nanoflow_fx.ops.backend import AttentionConfig, DecodeKernel, get
from nanoflow_fx.ops.kv_write import write_kv
from nanoflow_fx.passes.info import ATTENTION_OP
from nanoflow_fx.runtime.streams import StreamAction, stream_actions
from nanoflow_fx.schedule import NanoOp, OpGroup, Schedule, Split, validate

__all__ = ["Cut", "NanobatchStep", "PieceTimer", "ProgramRunner", "Units", "make_units", "planned_nanobatches",
           "program_schedule", "schedule_of", "sm_carveout"]

WHOLE = "whole"
SPLIT = "nb"
ATTENTION_SPLIT = "attn"  # the attention calls' split, when a cut gives them boundaries of their own


@dataclass(frozen=True)
class Units:
    """Execution units of nano-batched steps: a stream per unit (missing: a plain stream of its own), the SMs
    cuBLASLt leaves free while the compute unit launches its GEMMs (0: none), the kernel the memory unit
    attends decode rows with (None: the step backend's own; see `DecodeKernel`), and `gemm_sms`: when set, the
    step's matmuls run on the persistent Triton GEMM with that many programs (`ops.triton_gemm`) instead of
    cuBLAS, sized to the compute unit's partition."""

    streams: Mapping[str, Any]
    carveout: int = 0
    decode: DecodeKernel | None = None
    gemm_sms: int = 0


@dataclass(frozen=True)
class Cut:
    """How a split policy cuts one step: token boundaries (0, ..., tokens) and the execution units its
    nano-batches run on (None: one stream, in the Schedule's order). `attention`: other boundaries for the
    attention calls (None: the same), e.g. NanoFlow's uneven splits, attention in 4 nano-batches under GEMMs in 2."""

    boundaries: tuple[int, ...]
    units: Units | None = None
    attention: tuple[int, ...] | None = None


SplitPolicy = Callable[[int, int], "Cut | None"]
"""(step tokens, leading decode requests) -> how to cut the step (`Cut`), or None: run it whole."""


def cut_bounds(cut: Cut | None, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A cut's (dense boundaries, attention boundaries) for a step of `num_tokens` tokens (padding included),
    checked (from 0, strictly rising, ending at `num_tokens`); None when it cuts nothing."""
    if cut is None or (len(cut.boundaries) <= 2 and (cut.attention is None or len(cut.attention) <= 2)):
        return None
    boundaries = Split(cut.boundaries).boundaries  # (checks: from 0, strictly rising)
    attention = Split(cut.attention).boundaries if cut.attention is not None else boundaries
    for name, bounds in (("", boundaries), ("attention ", attention)):
        if bounds[-1] != num_tokens:
            raise ValueError(f"the split policy cut a step of {num_tokens} tokens (padding included) at {name}"
                             f"boundaries {bounds}: the last boundary must be {num_tokens}")
    return boundaries, attention


@dataclass(frozen=True)
class NanobatchStep:
    """One nano-batched step, as the step runner prepared it: token boundaries, and per nano-batch its attention
    metadata on the device (qo_indptr, kv_indptr, kv_indices, kv_last_page_len) and its backend plan (a
    planner that planned exactly that nano-batch, or None for backends that plan nothing)."""

    boundaries: tuple[int, ...]
    metadata: tuple[tuple[torch.Tensor, ...], ...]  # per attention nano-batch
    plans: tuple[Any, ...]
    units: Units | None = None
    attention_boundaries: tuple[int, ...] | None = None  # the attention calls' own cut (None: `boundaries`)

    @property
    def num_nanobatches(self) -> int:
        return len(self.boundaries) - 1

    @property
    def whole(self) -> bool:
        """Neither the dense pieces nor the attention calls are cut."""
        return self.num_nanobatches == 1 and (self.attention_boundaries is None or len(self.attention_boundaries) == 2)


def planned_nanobatches(parts: Sequence[Sequence[torch.Tensor]], planners: Sequence[Any], device: torch.device,
                        units: Units | None, boundaries: tuple[int, ...],
                        attention: tuple[int, ...]) -> NanobatchStep:
    """The `NanobatchStep` of a cut at `boundaries` (its attention calls at `attention`) whose attention nano-batches
    have the host tables `parts` (qo_indptr, kv_indptr, kv_indices, kv_last_page_len each; `split_attention_metadata`):
    each table copied to `device` and planned by its own planner (None: a backend that plans nothing)."""
    metadata = tuple(tuple(t.to(device, non_blocking=True) for t in part) for part in parts)
    plans = tuple(planner.plan_tables(part[0], part[1], part[3], meta[2]) if planner is not None else None
                  for planner, part, meta in zip(planners, parts, metadata))
    return NanobatchStep(boundaries, metadata, plans, units, attention if attention != boundaries else None)


def make_units(mode: str, memory_sms: int) -> Units | None:
    """The execution units `ExperimentalConfig.sm_partition=mode` names (None for "off": one stream): "streams":
    plain streams; "soft": the memory unit on a green-context partition of `memory_sms` SMs, the compute unit
    free; "carveout": as "soft", and the compute unit's cuBLASLt GEMMs leave those SMs free; "hard": the compute
    unit on the green-context partition of the remaining SMs, its GEMMs sized to them by the same carve-out;
    "hard-triton": as "hard", its GEMMs on the persistent Triton GEMM with one program per SM of that partition.

    Why "hard": a green context confines only its own kernels; in "soft" and "carveout" the compute unit's kernels
    may still be placed on SMs of the memory unit's partition whenever those are free. In "soft" the units do
    co-run for most of a step, but each kernel slows by about as much as they overlap, so the step is no faster
    (docs/findings.md). The carve-out sizes cuBLAS's grid to the compute partition (cuBLAS counts the device's
    SMs, not the green context's)."""
    if mode == "off":
        return None
    if mode == "streams":
        return Units({})
    from nanoflow_fx.runtime.green_context import split_sms

    memory, rest = split_sms(memory_sms)
    if mode == "soft":
        return Units({"memory": memory.stream})
    if mode == "carveout":
        return Units({"memory": memory.stream}, carveout=memory.num_sms)
    if mode == "hard":
        return Units({"memory": memory.stream, "compute": rest.stream}, carveout=memory.num_sms)
    if mode == "hard-triton":
        return Units({"memory": memory.stream, "compute": rest.stream}, gemm_sms=rest.num_sms)
    raise ValueError(f"no execution units for sm_partition={mode!r}")


@contextmanager
def sm_carveout(sms: int) -> Iterator[None]:
    """cuBLASLt matmuls launched inside leave `sms` SMs free (see the module docstring); restored on exit."""
    if sms <= 0:
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(previous)


def program_schedule(program: StepProgram, boundaries: Sequence[int], one_unit: bool = False,
                     attention: Sequence[int] | None = None) -> Schedule:
    """The Schedule of `program` cut at `boundaries` (its attention calls at `attention`, when given): groups are
    pieces (dense pieces on "compute", attention on "memory", or all on "compute" with `one_unit`), each
    nano-batch trailing the previous one so that its attention runs under the next nano-batch's dense piece."""
    return schedule_of(program.schedule_key, boundaries, one_unit, attention)


def schedule_of(kinds: Sequence[Sequence[Any]], boundaries: Sequence[int], one_unit: bool = False,
                attention: Sequence[int] | None = None) -> Schedule:
    """`program_schedule` from a program's `schedule_key` alone (what the cost model keeps of a program)."""
    key = tuple((str(n), str(k), bool(w), tuple(d)) for n, k, w, d in kinds)
    cut = tuple(int(b) for b in boundaries)
    return _planned(key, cut, one_unit, _other(attention, cut))[0]


def _other(attention: Sequence[int] | None, boundaries: tuple[int, ...]) -> tuple[int, ...] | None:
    """The attention calls' boundaries when they differ from the dense pieces' (else None: one split)."""
    if attention is None:
        return None
    cut = tuple(int(b) for b in attention)
    return None if cut == boundaries else cut


@lru_cache(maxsize=256)
def _planned(kinds: tuple[tuple[str, str, bool, tuple[str, ...]], ...], boundaries: tuple[int, ...],
             one_unit: bool, attention: tuple[int, ...] | None = None) -> tuple[Schedule, tuple[StreamAction, ...]]:
    """A cut's Schedule and its stream plan, built and validated once per (program shape, cut, units)."""
    schedule = _build_schedule(kinds, boundaries, one_unit, attention)
    return schedule, tuple(stream_actions(schedule))


_UNIT_OF = {"dense": "compute", "attention": "memory", "collective": "network"}  # a piece kind's execution unit
_CLASS_OF = {"dense": "gemm", "attention": "attention", "collective": "collective"}  # and its op class


def _build_schedule(kinds: tuple[tuple[str, str, bool, tuple[str, ...]], ...], boundaries: tuple[int, ...],
                    one_unit: bool, attention: tuple[int, ...] | None = None) -> Schedule:
    """Dense pieces split at `boundaries` ("nb"), attention calls at `attention` ("attn") when given, whole pieces
    unsplit ("whole"). A nano-op waits for the nano-ops of its producers on the other unit whose tokens overlap
    its own (all of them for a whole piece or producer); on its own unit program order keeps the dependency."""
    if attention is not None and attention[-1] != boundaries[-1]:
        raise ValueError(f"attention boundaries {attention} and dense boundaries {boundaries} cut different steps")
    splits = {SPLIT: Split(boundaries), WHOLE: Split((0, boundaries[-1]))}
    if attention is not None:
        splits[ATTENTION_SPLIT] = Split(attention)
    split_of = {name: WHOLE if whole else (ATTENTION_SPLIT if attention is not None and kind == "attention" else SPLIT)
                for name, kind, whole, _ in kinds}
    unit_of = {name: "compute" if one_unit else _UNIT_OF[kind] for name, kind, _, _ in kinds}
    groups, ops = [], []
    for name, kind, _, deps in kinds:
        groups.append(OpGroup(name, _CLASS_OF[kind], split_of[name], deps))
    for name, _, _, deps in kinds:
        own = splits[split_of[name]].boundaries
        for i in range(len(own) - 1):
            waits = set()
            for dep in deps:
                if unit_of[dep] == unit_of[name]:
                    continue
                theirs = splits[split_of[dep]].boundaries
                waits |= {(dep, j) for j in range(len(theirs) - 1)
                          if theirs[j] < own[i + 1] and own[i] < theirs[j + 1]}
            ops.append(NanoOp(name, i, unit_of[name], tuple(sorted(waits))))
    network = ("network",) if "network" in unit_of.values() else ()
    units = ("compute",) if one_unit else ("compute", "memory", *network)
    schedule = Schedule(boundaries[-1], tuple(splits.items()), tuple(groups), units, tuple(ops))
    validate(schedule)
    return schedule


class PieceTimer:
    """When each piece of a whole step ended (`ProgramRunner.run_whole` marks the start, then every piece): CUDA
    events on the current stream, or the host's clock on the CPU (where the step runs synchronously).
    `piece_ms()` after the step: ms per piece name (a name that runs several times adds up)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str | None, Any]] = []

    def mark(self, name: str | None) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def piece_ms(self) -> dict[str, float]:
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        times: dict[str, float] = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            assert name is not None  # (only the first mark, the start, has none)
            times[name] = times.get(name, 0.0) + ms
        return times


class ProgramRunner:
    """The lowered step AOT calls with the captured graph's flat inputs (see the module docstring)."""

    def __init__(self, program: StepProgram) -> None:
        self.program = program
        self._pieces = {p.name: p for p in program.pieces}
        self._streams: dict[str, Any] = {}
        self._sizes: dict[tuple[Any, ...], int] = {}  # symbolic sizes evaluated per nano-batch (`_Values.part`)
        self.last_schedule: Schedule | None = None
        self._drops = drops_after(program)  # (`run_whole`'s)
        self._nanobatch_drops: dict[tuple[Any, ...], tuple[tuple[str, ...], ...]] = {}  # (one stream's, per cut)

    def __call__(self, *args: Any) -> Any:
        context = current()
        record = context.nanobatches
        if record is None or record.whole:
            return self.run_whole(args, context.timer)
        return self.run_nanobatched(args, record)

    # -- whole -------------------------------------------------------------------------------------------------
    def run_whole(self, args: Sequence[Any], timer: PieceTimer | None = None) -> Any:
        """The pieces in order, each value dropped after the last piece that reads it (`drops_after`): a step holds
        what is still to be read, not every layer's activations until it returns."""
        env: dict[str, Any] = dict(zip(self.program.placeholders, args))
        if timer is not None:
            timer.mark(None)
        for piece, drops in zip(self.program.pieces, self._drops, strict=True):
            if piece.call is None:  # (a dense or collective piece)
                outs = piece.fn(*(env[i] for i in piece.inputs))  # type: ignore[misc]
                env.update(zip(piece.outputs, outs))
            else:
                call = piece.call
                assert call is not None
                env[piece.outputs[0]] = ATTENTION_OP(
                    env[call.q], env[call.k], env[call.v], env[call.cache], *(env[m] for m in call.metadata),
                    env[call.slot_mapping], call.scaling, call.sliding_window, call.softcap, call.backend,
                    call.scale_of(env))
            for name in drops:
                del env[name]
            if timer is not None:
                timer.mark(piece.name)
        return _map_names(self.program.output, env)

    # -- nano-batched ------------------------------------------------------------------------------------------
    def run_nanobatched(self, args: Sequence[Any], record: NanobatchStep) -> Any:
        program = self.program
        attention = record.attention_boundaries  # (None where it equals `boundaries`: `StepRunner` made the record)
        state = _Values(program, dict(zip(program.placeholders, args)), record.boundaries, self._sizes, attention)
        units = record.units
        use_units = units is not None and self._on_cuda(args)
        schedule, actions = _planned(program.schedule_key, record.boundaries, not use_units, attention)
        self.last_schedule = schedule
        with _partitioned_gemms(units.gemm_sms if units is not None else 0):  # (every matmul of the step: on the
            # GPU those are the compute unit's GEMMs; the attention kernels are not matmuls)
            if not use_units:  # (one stream: a value dropped after its last reader is free for the next op)
                key = (record.boundaries, attention)
                if key not in self._nanobatch_drops:
                    if len(self._nanobatch_drops) >= 256:  # (cuts repeat; a stream of new ones must not grow it)
                        self._nanobatch_drops.clear()
                    self._nanobatch_drops[key] = drops_after(program, [self._pieces[op.group] for op in schedule.ops])
                for op, drops in zip(schedule.ops, self._nanobatch_drops[key], strict=True):
                    self._run_op(op.group, op.nanobatch, state, record)
                    for name in drops:
                        state.drop(name)
            else:
                self._run_on_units(schedule, actions, state, record)
        return _map_names(program.output, state.joined)

    def _run_on_units(self, schedule: Schedule, actions: Sequence[StreamAction], state: _Values,
                      record: NanobatchStep) -> None:
        # (values stay alive until the step ends here: a tensor freed on one unit's stream while another's queued
        # kernels still read it would be handed out again too early)
        units = record.units
        streams = self._unit_streams(schedule.units, units)  # type: ignore[arg-type]
        main = torch.cuda.current_stream()
        fork = torch.cuda.Event()
        fork.record(main)
        for stream in streams.values():
            stream.wait_event(fork)
        events: dict[tuple[str, int], torch.cuda.Event] = {}
        with sm_carveout(units.carveout):  # type: ignore[union-attr]
            for action in actions:
                stream = streams[action.unit]
                for wait in action.waits:
                    stream.wait_event(events[wait])
                with torch.cuda.stream(stream):
                    self._run_op(action.key[0], action.key[1], state, record)
                if action.record:
                    events[action.key] = torch.cuda.Event()
                    events[action.key].record(stream)
        for stream in streams.values():
            main.wait_stream(stream)

    @staticmethod
    def _on_cuda(args: Sequence[Any]) -> bool:
        return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def _unit_streams(self, names: Sequence[str], units: Units) -> dict[str, Any]:
        """Each unit's stream: the one `units` gives, else a plain stream of this runner's own."""
        for name in names:
            if name not in units.streams and name not in self._streams:
                self._streams[name] = torch.cuda.Stream()
        return {name: units.streams.get(name) or self._streams[name] for name in names}

    def _run_op(self, name: str, i: int, state: _Values, record: NanobatchStep) -> None:
        piece = self._pieces[name]
        if piece.whole:
            values = [state.joined(n) for n in piece.inputs]
            outs = piece.fn(*values)  # type: ignore[misc]
            for out, value in zip(piece.outputs, outs):
                state.whole[out] = value
            return
        if piece.call is None:
            outs = piece.fn(*(state.part(n, i) for n in piece.inputs))  # type: ignore[misc]
            for out, value in zip(piece.outputs, outs):
                state.put(out, i, value)
            return
        call = piece.call
        assert call is not None
        split = state.attention_split
        q, k, v = (state.part(n, i, split) for n in (call.q, call.k, call.v))
        cache = state.joined(call.cache)
        kv_scale = state.joined(call.kv_scale) if call.kv_scale is not None else None
        write_kv(cache, k, v, state.part(call.slot_mapping, i, split), kv_scale)
        config = AttentionConfig(q.shape[1], cache.shape[3], q.shape[2], call.scaling, call.sliding_window,
                                 call.softcap)
        decode = record.units.decode if record.units is not None else None  # (attention is the memory unit's)
        state.put(piece.outputs[0], i, get(call.backend).run_planned(
            record.plans[i], config, q, cache, record.metadata[i], decode, kv_scale), split)


class _Values:
    """A nano-batched step's values: whole ones (inputs, outputs of whole pieces, joins) and each nano-batch's, per
    split (the dense pieces' "nb"; the attention calls' "attn" when a cut gives them boundaries of their own). A
    value made in one split and read in another is joined from the parts that overlap the reader's tokens only
    (the Schedule's waits cover exactly those)."""

    def __init__(self, program: StepProgram, inputs: dict[str, Any], boundaries: Sequence[int],
                 sizes: dict[tuple[Any, ...], int] | None = None,
                 attention: Sequence[int] | None = None) -> None:
        self.program, self.whole = program, inputs
        self.split_bounds = {SPLIT: tuple(boundaries)}
        if attention is not None:
            self.split_bounds[ATTENTION_SPLIT] = tuple(attention)
        self.attention_split = ATTENTION_SPLIT if attention is not None else SPLIT
        self.split_parts: dict[str, list[dict[str, Any]]] = {
            name: [{} for _ in range(len(b) - 1)] for name, b in self.split_bounds.items()}
        self.made_in: dict[str, str] = {}  # value -> the split whose nano-batches made it
        self.symbols = {program.symbolic[name]: value for name, value in inputs.items()
                        if name in program.symbolic and program.symbolic[name].is_Symbol}
        # sympy's subs costs ~70 us a call: the runner keeps each size it evaluated, by (name, the nano-batch's
        # tokens, the step's other symbol values)
        self.sizes = sizes if sizes is not None else {}
        self.symbol_values = tuple(int(v) for sym, v in self.symbols.items() if sym != program.token)

    def put(self, name: str, i: int, value: Any, split: str = SPLIT) -> None:
        self.split_parts[split][i][name] = value
        self.made_in[name] = split

    def drop(self, name: str) -> None:
        """Forget every form of `name` (whole, joined, each nano-batch's part or slice): no later op reads it."""
        self.whole.pop(name, None)
        for parts in self.split_parts.values():
            for part in parts:
                part.pop(name, None)

    def part(self, name: str, i: int, split: str = SPLIT) -> Any:
        cache = self.split_parts[split][i]
        if name in cache:
            return cache[name]
        bounds = self.split_bounds[split]
        start, end = bounds[i], bounds[i + 1]
        if name in self.program.symbolic and name in self.whole:  # a size: re-evaluated for the nano-batch
            expr = self.program.symbolic[name]
            token = self.program.token
            if token is not None and token in expr.free_symbols:
                key = (name, end - start, self.symbol_values)
                value: Any = self.sizes.get(key)
                if value is None:
                    if len(self.sizes) > 4096:  # step shapes repeat; a stream of new ones must not grow it forever
                        self.sizes.clear()
                    value = self.sizes[key] = int(expr.subs({**self.symbols, token: end - start}))
            else:
                value = self.whole[name]
        elif name not in self.whole and self.made_in.get(name, split) != split:
            value = self._across(name, start, end)
        else:
            whole = self.joined(name)
            dim = self.program.token_dim.get(name)
            value = whole if dim is None or not isinstance(whole, torch.Tensor) else whole.narrow(dim, start,
                                                                                                 end - start)
        cache[name] = value
        return value

    def _across(self, name: str, start: int, end: int) -> Any:
        """Tokens [start, end) of a value made in another split: its overlapping parts joined, then narrowed."""
        split = self.made_in[name]
        bounds, parts = self.split_bounds[split], self.split_parts[split]
        overlap = [j for j in range(len(parts)) if bounds[j] < end and start < bounds[j + 1]]
        dim = self.program.token_dim.get(name)
        first = parts[overlap[0]][name]
        if dim is None or not isinstance(first, torch.Tensor):
            return first
        joined = first if len(overlap) == 1 else torch.cat([parts[j][name] for j in overlap], dim=dim)
        return joined.narrow(dim, start - bounds[overlap[0]], end - start)

    def joined(self, name: str) -> Any:
        if name in self.whole:
            return self.whole[name]
        parts = [p[name] for p in self.split_parts[self.made_in.get(name, SPLIT)]]
        dim = self.program.token_dim.get(name)
        if dim is None or not isinstance(parts[0], torch.Tensor):
            value = parts[0]
        else:
            value = torch.cat(parts, dim=dim)
        self.whole[name] = value
        return value


def drops_after(program: StepProgram, order: Sequence[Piece] | None = None) -> tuple[tuple[str, ...], ...]:
    """Per piece run in `order` (`program`'s pieces by default; a nano-batched step's: the piece of each of its
    nano-ops, a piece once per nano-batch), the values no later one reads and the output does not name (inputs
    included: the caller holds its own): a step run in that order can drop them once that piece has run. (An
    attention piece's inputs are every value its call reads.)"""
    pieces = program.pieces if order is None else order
    keep = {name for name in tree_leaves(program.output) if isinstance(name, str)}
    last: dict[str, int] = {name: -1 for name in program.placeholders}
    for j, piece in enumerate(pieces):
        for name in piece.inputs:
            last[name] = j
        for name in piece.outputs:
            last.setdefault(name, j)  # (a value nothing reads: dropped where it is made)
    drops: list[list[str]] = [[] for _ in pieces]
    for name, j in last.items():
        if name not in keep and j >= 0:
            drops[j].append(name)
    return tuple(tuple(d) for d in drops)


def _map_names(structure: Any, env: Any) -> Any:
    get_value = env if callable(env) else env.__getitem__
    if isinstance(structure, str):
        return get_value(structure)
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map_names(s, env) for s in structure)
    return structure


def _partitioned_gemms(num_sms: int) -> contextlib.AbstractContextManager[Any]:
    """`ops.triton_gemm.partitioned_gemms(num_sms)`, importing Triton only for a "hard-triton" compute unit
    (num_sms > 0): the CPU build of torch comes without Triton, and every other unit mode runs without it."""
    if num_sms <= 0:
        return contextlib.nullcontext()
    from nanoflow_fx.ops.triton_gemm import partitioned_gemms

    return partitioned_gemms(num_sms)

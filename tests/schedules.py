"""Hand-built schedules over an abstract decoder (test fixtures of the Schedule IR): four op groups per layer,
and `add_needed_waits`. The runtime builds its schedules from the lowered program (`program_runner.schedule_of`).

Layer i has groups L{i}.qkv (gemm) <- L{i-1}.ffn, L{i}.attn (attention) <- L{i}.qkv,
L{i}.o (gemm) <- L{i}.attn, L{i}.ffn (gemm) <- L{i}.o (L0.qkv has no deps).

- `sequential`: one nano-batch, one unit: the plain path that defines the correct answer.
- `nanoflow_pingpong`: two halves; one half's attention (on "memory") overlaps the other half's GEMMs.
- `split_4_2`: as pingpong, with qkv and attention cut 4 ways and o / ffn cut 2 ways (NanoFlow's 70B plan).

Every builder lists each unit's program, interleaves them into one global order, then adds the fewest
waits that keep every cross-unit dependency (`add_needed_waits`). All of them pass `validate`.
"""

from __future__ import annotations

from dataclasses import replace

from nanoflow_fx.schedule.ir import (
    NanoOp,
    OpGroup,
    Schedule,
    ScheduleError,
    Split,
    op_label,
)

__all__ = ["LAYER_GROUPS", "add_needed_waits", "nanoflow_pingpong", "sequential", "split_4_2"]

LAYER_GROUPS: tuple[tuple[str, str], ...] = (("qkv", "gemm"), ("attn", "attention"), ("o", "gemm"), ("ffn", "gemm"))
"""(short name, op class) of each group of one abstract layer, in dependency order."""

Key = tuple[str, int]


def sequential(num_layers: int, num_tokens: int) -> Schedule:
    """One nano-batch (split "all" = (0, num_tokens)) of every group on unit "compute", layer by layer.

    No waits: program order on the single unit keeps every dependency.
    """
    _check_sizes(num_layers, num_tokens, min_tokens=1)
    groups = _layer_groups(num_layers, {"qkv": "all", "attn": "all", "o": "all", "ffn": "all"})
    program = [(g.name, 0) for g in groups]
    return _assemble(num_tokens, (("all", Split((0, num_tokens))),), groups, {"compute": program})


def nanoflow_pingpong(num_layers: int, num_tokens: int) -> Schedule:
    """NanoFlow's single-GPU (8B) pipeline: two nano-batches (split "s2", even), units compute and memory.

    Attention runs on "memory", GEMMs on "compute". Writing Xh for group X of layer i, half h, the
    canonical compute program skews halves across layers so each half's attention hides behind the
    other half's GEMMs:

        layer 0:   qkv0 qkv1 o0 ffn0
        layer i>0: qkv0 | o1 ffn1 (of layer i-1) | qkv1 o0 ffn0
        at the end:      o1 ffn1 (of the last layer)
        memory:    attn0 attn1 for each layer

    so attn1 runs while o0 ffn0 (and the next layer's qkv0) compute, and the next layer's attn0 runs
    while o1 ffn1 (and qkv1) compute. For one layer the compute order is qkv0 qkv1 o0 ffn0 o1 ffn1.
    Waits: attnh <- qkvh and oh <- attnh (the only cross-unit edges). Requires num_tokens >= 2.
    """
    _check_sizes(num_layers, num_tokens, min_tokens=2)
    splits = (("s2", Split.even(num_tokens, 2)),)
    groups = _layer_groups(num_layers, {"qkv": "s2", "attn": "s2", "o": "s2", "ffn": "s2"})
    return _two_half_schedule(num_layers, num_tokens, splits, groups)


def split_4_2(num_layers: int, num_tokens: int) -> Schedule:
    """NanoFlow's 70B-style plan: qkv and attn cut 4 ways ("s4"), o and ffn cut 2 ways ("s2").

    "s2" is Split.even(num_tokens, 2) and "s4" cuts each of its halves evenly in two, so nano-batches
    0-1 of s4 lie in nano-batch 0 of s2. Programs as in `nanoflow_pingpong`, with "qkvh" meaning both s4
    nano-batches of half h (and likewise attn): o0 then waits on attn1 only, because attn0 precedes attn1
    on the memory unit. Requires num_tokens >= 4.
    """
    _check_sizes(num_layers, num_tokens, min_tokens=4)
    s2 = Split.even(num_tokens, 2)
    splits = (("s4", _refine(s2, 2)), ("s2", s2))
    groups = _layer_groups(num_layers, {"qkv": "s4", "attn": "s4", "o": "s2", "ffn": "s2"})
    return _two_half_schedule(num_layers, num_tokens, splits, groups)


def add_needed_waits(schedule: Schedule) -> Schedule:
    """`schedule` with its waits replaced by the fewest (greedily) that keep every dependency.

    Requires: names resolve, and `ops` is in a topological order of the dependencies (each nano-op it
    needs, i.e. each overlapping nano-batch of each dep group, appears earlier in `ops`). Ensures: an op
    waits on a needed nano-op only if program order and its other waits do not already order it first.
    Raises ScheduleError naming the op if a needed nano-op comes later or is missing.
    """
    position: dict[Key, int] = {}
    ancestors: list[int] = []  # bit p set: ops[p] happens-before this op
    last_on_unit: dict[str, int] = {}
    ops: list[NanoOp] = []
    for v, op in enumerate(schedule.ops):
        prev = last_on_unit.get(op.unit)
        reach = 0 if prev is None else ancestors[prev] | (1 << prev)
        waits: list[int] = []
        for p in sorted((_position_of(position, key, op) for key in _needed(schedule, op.key)), reverse=True):
            if not reach >> p & 1:  # latest first: its ancestors may cover the earlier ones
                waits.append(p)
                reach |= ancestors[p] | (1 << p)
        ops.append(replace(op, waits=tuple(schedule.ops[p].key for p in sorted(waits))))
        ancestors.append(reach)
        position[op.key] = v
        last_on_unit[op.unit] = v
    return replace(schedule, ops=tuple(ops))


def _position_of(position: dict[Key, int], key: Key, op: NanoOp) -> int:
    if key not in position:
        raise ScheduleError(
            f"nano-op {op_label(op.key)} needs {op_label(key)}, which does not come before it in Schedule.ops; "
            "order the ops topologically before adding waits"
        )
    return position[key]


def _needed(schedule: Schedule, key: Key) -> list[Key]:
    """The nano-ops `key` consumes: each nano-batch of each dep group that overlaps its token range."""
    start, end = schedule.token_range(*key)
    return [(d, i) for d in schedule.group(key[0]).deps for i in schedule.split_of(d).overlapping(start, end)]


def _check_sizes(num_layers: int, num_tokens: int, min_tokens: int) -> None:
    if num_layers < 1:
        raise ScheduleError(f"num_layers={num_layers} must be >= 1")
    if num_tokens < min_tokens:
        raise ScheduleError(f"num_tokens={num_tokens} must be >= {min_tokens} so no nano-batch is empty")


def _refine(split: Split, parts: int) -> Split:
    """Cut each nano-batch of `split` evenly into `parts` (so the result nests inside `split`)."""
    bounds = [0]
    for i in range(split.num_nanobatches):
        start, end = split.range(i)
        bounds += [start + b for b in Split.even(end - start, parts).boundaries[1:]]
    return Split(tuple(bounds))


def _layer_groups(num_layers: int, split_of: dict[str, str]) -> tuple[OpGroup, ...]:
    groups: list[OpGroup] = []
    for i in range(num_layers):
        prev = f"L{i - 1}.ffn" if i > 0 else None
        for short, op_class in LAYER_GROUPS:
            deps = (prev,) if prev is not None else ()
            groups.append(OpGroup(f"L{i}.{short}", op_class, split_of[short], deps))
            prev = f"L{i}.{short}"
    return tuple(groups)


def _two_half_schedule(num_layers: int, num_tokens: int, splits: tuple[tuple[str, Split], ...],
                       groups: tuple[OpGroup, ...]) -> Schedule:
    """Programs of `nanoflow_pingpong` (see its docstring) over whatever splits `groups` use."""
    skeleton = Schedule(num_tokens, splits, groups, ("compute", "memory"), ())
    mid = Split.even(num_tokens, 2).boundaries[1]

    def half(short: str, layer: int, h: int) -> list[Key]:
        name = f"L{layer}.{short}"
        return [(name, i) for i in skeleton.split_of(name).overlapping(*((0, mid), (mid, num_tokens))[h])]

    compute = half("qkv", 0, 0) + half("qkv", 0, 1) + half("o", 0, 0) + half("ffn", 0, 0)
    for i in range(1, num_layers):
        compute += half("qkv", i, 0) + half("o", i - 1, 1) + half("ffn", i - 1, 1)
        compute += half("qkv", i, 1) + half("o", i, 0) + half("ffn", i, 0)
    compute += half("o", num_layers - 1, 1) + half("ffn", num_layers - 1, 1)
    memory = [k for i in range(num_layers) for k in half("attn", i, 0) + half("attn", i, 1)]
    return _assemble(num_tokens, splits, groups, {"compute": compute, "memory": memory})


def _assemble(num_tokens: int, splits: tuple[tuple[str, Split], ...], groups: tuple[OpGroup, ...],
              programs: dict[str, list[Key]]) -> Schedule:
    """Interleave per-unit programs into one global order (round robin, one ready op per unit per pass),
    then add the needed waits. An op is ready once every nano-op it needs has been placed."""
    skeleton = Schedule(num_tokens, splits, groups, tuple(programs), ())
    heads = {unit: 0 for unit in programs}
    placed: set[Key] = set()
    ops: list[NanoOp] = []
    while len(ops) < sum(len(p) for p in programs.values()):
        progressed = False
        for unit, program in programs.items():
            if heads[unit] < len(program) and placed.issuperset(_needed(skeleton, program[heads[unit]])):
                ops.append(NanoOp(*program[heads[unit]], unit))
                placed.add(program[heads[unit]])
                heads[unit] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"unit programs deadlock at heads {heads}; a builder ordered ops wrongly")
    return add_needed_waits(replace(skeleton, ops=tuple(ops)))

"""A compact line-based text form of a Schedule; `parse_schedule(format_schedule(s)) == s` for every Schedule.

The form, in this order (blank lines and lines starting with '#' are ignored by the parser):

    tokens 1024                                  # Schedule.num_tokens
    split s2 0 512 1024                          # one line per named Split: name, then its boundaries
    group L0.qkv gemm s2                         # one line per OpGroup: name, op_class, split [<- deps]
    group L0.attn attention s2 <- L0.qkv
    units compute memory                         # Schedule.units (possibly none)
    compute L0.qkv#0                             # then one line per NanoOp, in global program order:
    memory L0.attn#0 <- L0.qkv#0                 #   unit group#nanobatch [<- group#nanobatch ...]

Every line after `units` is an op line, so a unit may even be called "split". Names (splits, groups,
op classes, units) are non-empty and contain no whitespace, '#' or '<-'; `format_schedule` rejects others.
The round trip holds for invalid schedules too (e.g. unknown units), as long as names and ints are well typed.
"""

from __future__ import annotations

import re
from typing import Any

from nanoflow_fx.schedule.ir import (
    NanoOp,
    OpGroup,
    Schedule,
    ScheduleError,
    Split,
    op_label,
)

__all__ = ["format_schedule", "parse_schedule"]

_ARROW = "<-"
_INT = re.compile(r"-?[0-9]+")
_STAGES = {"tokens": 0, "split": 1, "group": 2, "units": 3}  # op lines are stage 4


def format_schedule(s: Schedule) -> str:
    """The text form of `s` (see the module docstring), ending in a newline.

    Raises ScheduleError if a name is not writable (empty, or holds whitespace, '#' or '<-') or an int
    field is not an int.
    """
    lines = [f"tokens {_int_text(s.num_tokens, 'Schedule.num_tokens')}"]
    for name, split in s.splits:
        lines.append(" ".join(["split", _name_text(name, "split name"), *map(str, split.boundaries)]))
    lines.extend(_group_line(g) for g in s.groups)
    lines.append(" ".join(["units", *(_name_text(u, "unit") for u in s.units)]))
    lines.extend(_op_line(op) for op in s.ops)
    return "\n".join(lines) + "\n"


def parse_schedule(text: str) -> Schedule:
    """The Schedule whose text form is `text`; raises ScheduleError naming the line number and line.

    Checks syntax and line order only; call `validate` for the schedule's own invariants.
    """
    parts: dict[str, list[Any]] = {"tokens": [], "split": [], "group": [], "units": [], "ops": []}
    stage = -1
    for lineno, raw in enumerate(text.split("\n"), start=1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            stage = _parse_line(words, stage, parts)
        except ScheduleError as e:
            raise ScheduleError(f"line {lineno}: {e}: {raw!r}") from None
    if not parts["tokens"] or not parts["units"]:
        missing = "tokens N" if not parts["tokens"] else "units <unit> ..."
        raise ScheduleError(f"schedule text has no '{missing}' line; the order is tokens, split, group, units, ops")
    return Schedule(parts["tokens"][0], tuple(parts["split"]), tuple(parts["group"]), parts["units"][0],
                    tuple(parts["ops"]))


def _parse_line(words: list[str], stage: int, parts: dict[str, list[Any]]) -> int:
    """Parse one non-blank line into `parts`; returns the new stage (the kind of section we are in)."""
    if stage >= _STAGES["units"]:
        parts["ops"].append(_parse_op(words))
        return 4
    kind = words[0]
    if kind not in _STAGES:
        raise ScheduleError(f"expected a 'tokens', 'split', 'group' or 'units' line, got {kind!r}")
    new_stage = _STAGES[kind]
    if new_stage < stage or (new_stage == stage and kind == "tokens") or (stage < 0 and kind != "tokens"):
        raise ScheduleError(f"'{kind}' line out of order; the order is tokens, split, group, units, ops")
    parse = {"tokens": _parse_tokens, "split": _parse_split, "group": _parse_group, "units": _parse_units}[kind]
    parts[kind].append(parse(words))
    return new_stage


def _parse_tokens(words: list[str]) -> int:
    if len(words) != 2:
        raise ScheduleError("expected 'tokens <num_tokens>'")
    return _parse_int(words[1])


def _parse_split(words: list[str]) -> tuple[str, Split]:
    if len(words) < 3:
        raise ScheduleError("expected 'split <name> 0 <boundary> ...'")
    return _parse_name(words[1], "split name"), Split(tuple(_parse_int(w) for w in words[2:]))


def _parse_group(words: list[str]) -> OpGroup:
    head, deps = _split_arrow(words, 4, "'group <name> <op_class> <split> [<- <dep> ...]'")
    name, op_class, split = (_parse_name(w, what) for w, what in zip(head[1:], ("group", "op_class", "split"),
                                                                       strict=True))
    return OpGroup(name, op_class, split, tuple(_parse_name(d, "dep") for d in deps))


def _parse_units(words: list[str]) -> tuple[str, ...]:
    return tuple(_parse_name(w, "unit") for w in words[1:])


def _parse_op(words: list[str]) -> NanoOp:
    head, waits = _split_arrow(words, 2, "'<unit> <group>#<nanobatch> [<- <group>#<nanobatch> ...]'")
    group, nanobatch = _parse_ref(head[1])
    return NanoOp(group, nanobatch, _parse_name(head[0], "unit"), tuple(_parse_ref(w) for w in waits))


def _split_arrow(words: list[str], head_len: int, syntax: str) -> tuple[list[str], list[str]]:
    """words = head + optionally ['<-', name, ...]; returns (head, names after the arrow)."""
    head, rest = words[:head_len], words[head_len:]
    if len(head) < head_len or (rest and (rest[0] != _ARROW or len(rest) < 2)):
        raise ScheduleError(f"expected {syntax}")
    return head, rest[1:]


def _parse_ref(word: str) -> tuple[str, int]:
    pieces = word.split("#")
    if len(pieces) != 2:
        raise ScheduleError(f"expected <group>#<nanobatch>, got {word!r}")
    return _parse_name(pieces[0], "group"), _parse_int(pieces[1])


def _parse_name(word: str, what: str) -> str:
    if not word or "#" in word or _ARROW in word:
        raise ScheduleError(f"{what} {word!r} is not a valid name (it must not be empty or hold '#' or '<-')")
    return word


def _parse_int(word: str) -> int:
    if not _INT.fullmatch(word):
        raise ScheduleError(f"expected an integer, got {word!r}")
    return int(word)


def _group_line(g: OpGroup) -> str:
    head = ["group", _name_text(g.name, "group"), _name_text(g.op_class, f"op_class of group {g.name!r}"),
            _name_text(g.split, f"split of group {g.name!r}")]
    return " ".join(head + _arrow([_name_text(d, f"dep of group {g.name!r}") for d in g.deps]))


def _op_line(op: NanoOp) -> str:
    where = f"nano-op {op.group!r}#{op.nanobatch!r}"
    head = [_name_text(op.unit, f"unit of {where}"), _ref_text(op.key, where)]
    return " ".join(head + _arrow([_ref_text(w, f"a wait of {where}") for w in op.waits]))


def _arrow(names: list[str]) -> list[str]:
    return [_ARROW, *names] if names else []


def _ref_text(key: tuple[str, int], where: str) -> str:
    _name_text(key[0], f"group of {where}")
    _int_text(key[1], f"nanobatch of {where}")
    return op_label(key)


def _name_text(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "#" in name or _ARROW in name:
        raise ScheduleError(
            f"cannot write {what} {name!r}: names must be non-empty strings without whitespace, '#' or '<-'; "
            "rename it"
        )
    return name


def _int_text(value: object, what: str) -> str:
    if type(value) is not int:
        raise ScheduleError(f"cannot write {what} {value!r}: it must be an int")
    return str(value)

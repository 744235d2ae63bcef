"""The Schedule IR: nano-ops (token slices of op groups) placed on execution units, in program order.

Plain data with no FX and no CUDA, shared by the cost model and the runtime (`runtime.program_runner` builds a
lowered program's Schedule for each cut):

    s = schedule_of(program.schedule_key, (0, 512, 1024))
    validate(s)                                   # raises ScheduleError naming the bad op
    text = format_schedule(s)                     # parse_schedule(text) == s
    print(format_timeline(simulate(s, cost_us=lambda op: 1.0)))
"""

from nanoflow_fx.schedule.ir import (
    OP_CLASSES,
    NanoOp,
    OpGroup,
    Schedule,
    ScheduleError,
    Split,
    op_label,
)
from nanoflow_fx.schedule.text import format_schedule, parse_schedule
from nanoflow_fx.schedule.timeline import Slot, Timeline, format_timeline, simulate
from nanoflow_fx.schedule.validate import validate

__all__ = [
    "OP_CLASSES",
    "NanoOp",
    "OpGroup",
    "Schedule",
    "ScheduleError",
    "Slot",
    "Split",
    "Timeline",
    "format_schedule",
    "format_timeline",
    "op_label",
    "parse_schedule",
    "simulate",
    "validate",
]

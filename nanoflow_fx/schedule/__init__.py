"""The Schedule IR: nano-ops (token slices of op groups) placed on execution units, in program order.

Plain data with no FX and no CUDA, shared by the cost model, the CPU executor and the GPU runtime:

    s = split_4_2(num_layers=32, num_tokens=2048)
    validate(s)                                   # raises ScheduleError naming the bad op
    text = format_schedule(s)                     # parse_schedule(text) == s
    print(format_timeline(simulate(s, cost_us=lambda op: 1.0)))
"""

from nanoflow_fx.schedule.builders import (
    LAYER_GROUPS,
    add_needed_waits,
    nanoflow_pingpong,
    sequential,
    split_4_2,
)
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
    "LAYER_GROUPS",
    "OP_CLASSES",
    "NanoOp",
    "OpGroup",
    "Schedule",
    "ScheduleError",
    "Slot",
    "Split",
    "Timeline",
    "add_needed_waits",
    "format_schedule",
    "format_timeline",
    "nanoflow_pingpong",
    "op_label",
    "parse_schedule",
    "sequential",
    "simulate",
    "split_4_2",
    "validate",
]

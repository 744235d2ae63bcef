"""Runtime: paged KV cache, token-packed steps, the scheduler, the step runner, the engine and generate."""

from nanoflow_fx.runtime.batch import Chunk, StepInputs, build_step
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.kv_cache import PageAllocator, PagedKVCache
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.scheduler import SchedulerLimits, StepPlan, schedule
from nanoflow_fx.runtime.step_runner import StepRunner

__all__ = ["Chunk", "Engine", "PageAllocator", "PagedKVCache", "Request", "SchedulerLimits", "StepInputs",
           "StepPlan", "StepRunner", "build_step", "schedule"]

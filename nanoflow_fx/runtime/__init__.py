"""Runtime: paged KV cache, request batching, the step engine and the generate loop."""

from nanoflow_fx.runtime.batch import Chunk, Request, StepInputs, build_step
from nanoflow_fx.runtime.engine import StepEngine
from nanoflow_fx.runtime.kv_cache import PageAllocator, PagedKVCache

__all__ = ["Chunk", "PageAllocator", "PagedKVCache", "Request", "StepEngine", "StepInputs", "build_step"]

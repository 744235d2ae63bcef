"""A hand-sized step graph: a toy token-parallel GEMM, the nanoflow attention op and a token-mixing op."""

from __future__ import annotations

import torch

from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.lowering import Capture, Lowering
from nanoflow_fx.ops import paged_attention
from nanoflow_fx.ops.backend import AttentionConfig
from nanoflow_fx.runtime import Chunk, PagedKVCache, Request, build_step
from tests.steps import GREEDY

HIDDEN = 4


def toy_step(x: torch.Tensor, w: torch.Tensor, kv_cache: torch.Tensor, qo: torch.Tensor, kvp: torch.Tensor,
             kvi: torch.Tensor, last: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ w)  # [T, 4]: a GEMM against a weight, then a pointwise op (token-parallel)
    q = h.view(-1, 1, HIDDEN)  # one head of dim 4
    a = paged_attention(q, q, q, kv_cache, qo, kvp, kvi, last, slots, 0.5, 0, 0.0)
    y = a.view(-1, HIDDEN) * 2.0
    return y.cumsum(0)  # mixes tokens: its group stays whole


def capture_toy() -> Capture:
    """The toy step captured and lowered by the nanoflow backend (symbolic token count), nothing run yet."""
    captures: list[Capture] = []
    compiled = torch.compile(toy_step, backend=make_backend(Lowering(), on_capture=captures.append), fullgraph=True)
    args = toy_inputs([3, 2])[0]
    for i in (0, 3, 4, 5, 6, 7):
        torch._dynamo.mark_dynamic(args[i], 0)
    compiled(*args)
    return captures[0]


def toy_inputs(lengths: list[int], page_size: int = 2) -> tuple[list[torch.Tensor], PagedKVCache]:
    """Inputs of `toy_step` for one prefill step of requests of `lengths` tokens."""
    torch.manual_seed(0)
    cache = PagedKVCache([AttentionConfig(1, 1, HIDDEN, HIDDEN**-0.5, 0, 0.0)], num_pages=16, page_size=page_size,
                         dtype=torch.float32, device=torch.device("cpu"))
    requests = [Request(f"r{i}", list(range(1, n + 1)), GREEDY, 0) for i, n in enumerate(lengths)]
    for req in requests:
        req.pages = cache.allocator.allocate(cache.pages_for(len(req.prompt)))
    step = build_step([Chunk(r, len(r.prompt)) for r in requests], cache.caches, page_size, cache.scratch_page,
                      torch.device("cpu"))
    num_tokens = step.input_ids.shape[0]
    x = torch.randn(num_tokens, HIDDEN)
    w = torch.randn(HIDDEN, HIDDEN)
    return [x, w, cache.caches[0], *step.metadata.tensors()], cache

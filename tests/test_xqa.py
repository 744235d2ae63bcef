"""`NanoFlowConfig.fp8_attention`: decode rows over an FP8 cache on FlashInfer's XQA kernel (`nanoflow_fx.ops.xqa`).

On the CPU: the dense page tables XQA reads equal the steps' CSR tables (hypothesis), the layer's scales reach XQA's
launch as its two scales, a FlashInfer planner (a stand-in flashinfer package) sends decode rows to XQA and prefill
rows to its prefill wrapper, and the config's errors. On the GPU (`cuda`; FlashInfer >= 0.5 on a Hopper GPU): XQA's
output within e4m3's rounding of fp32 attention over the dequantised cache (eager and CUDA-graph planners), and an
engine whose graph replays equal its eager steps.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoflow_fx
from nanoflow_fx.errors import NanoFlowError
from nanoflow_fx.ops import xqa
from nanoflow_fx.ops.backend import AttentionConfig
from tests.tiny_models import build

E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------------------ CPU
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=9), st.sampled_from([16, 32]), st.data())
def test_tables_hold_each_requests_pages_and_length(lengths: list[int], page: int, data: st.DataObject) -> None:
    """Row r of the table holds request r's pages in order (then zeros), its length is its token count; a second
    fill with fewer rows (a later step on the same buffers) rewrites exactly those rows."""
    pages = [-(-n // page) for n in lengths]
    ids = data.draw(st.permutations(range(sum(pages) + 3)))
    kv_ptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    kv_indices = torch.tensor(ids[: sum(pages)] + [-7] * 3, dtype=torch.int32)  # (a padded page list's tail)
    last = torch.tensor([n - (p - 1) * page for n, p in zip(lengths, pages)], dtype=torch.int32)
    width = max(pages) + data.draw(st.integers(0, 3))
    tables = xqa.XqaTables(len(lengths) + 1, width, page, torch.device("cpu"))
    for n in (len(lengths), data.draw(st.integers(0, len(lengths)))):
        tables.fill(kv_ptr[: n + 1], last[:n], kv_indices)
        for r in range(n):
            want = ids[int(kv_ptr[r]): int(kv_ptr[r + 1])]
            assert tables.table[r, : len(want)].tolist() == want
            assert not tables.table[r, len(want):].any()
            assert int(tables.lengths[r]) == lengths[r]


def test_tables_refuse_a_request_longer_than_the_width() -> None:
    tables = xqa.XqaTables(2, 3, 16, torch.device("cpu"))
    kv_ptr, last = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([5, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="4 pages is longer than XQA's table"):
        tables.fill(kv_ptr, last, torch.arange(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 decode rows"):
        tables.fill(torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.ones(3, dtype=torch.int32),
                    torch.arange(3, dtype=torch.int32))


def _stand_in_xqa(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in `flashinfer.decode.xqa_batch_decode_with_kv_cache` recording its arguments (zeros out)."""
    calls: list[dict[str, Any]] = []

    def xqa_batch_decode_with_kv_cache(query: torch.Tensor, kv_cache: torch.Tensor, workspace: torch.Tensor,
                                       block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                                       **kw: Any) -> torch.Tensor:
        calls.append(dict(query=query, block_tables=block_tables, seq_lens=seq_lens, max_seq_len=max_seq_len, **kw))
        out = kw.get("out")
        return torch.zeros_like(query) if out is None else out.zero_()

    package, decode = types.ModuleType("flashinfer"), types.ModuleType("flashinfer.decode")
    decode.xqa_batch_decode_with_kv_cache = xqa_batch_decode_with_kv_cache  # type: ignore[attr-defined]
    package.decode = decode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.decode", decode)
    return calls


def test_run_gives_xqa_the_layers_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """bmm1 = k_scale x the softmax scale, bmm2 = v_scale: host floats where the cache has them, else the device
    tensors (their values read at launch); over a 16-bit cache the scales are the softmax scale and 1. The table's
    rows are the query's, its width times the page size XQA's max_seq_len; a window of w tokens is window_left w-1."""
    calls = _stand_in_xqa(monkeypatch)
    config = AttentionConfig(8, 2, 64, 0.125, 24, 0.0)
    tables = xqa.XqaTables(4, 5, 16, torch.device("cpu"))
    q, cache = torch.randn(3, 8, 64), torch.zeros(9, 2, 16, 2, 64, dtype=E4M3)
    kv_scale = torch.tensor([0.5, 3.0])
    xqa.run(tables, config, q, cache, kv_scale, scale_values=lambda s: (0.5, 3.0) if s is kv_scale else None)
    xqa.run(tables, config, q, cache, kv_scale)
    xqa.run(tables, config, q, cache, None)
    host, device, plain = calls
    assert (host["bmm1_scale"], host["bmm2_scale"]) == (0.5 * 0.125, 3.0)
    assert device["bmm1_scale"].tolist() == [0.5 * 0.125] and device["bmm2_scale"].tolist() == [3.0]
    assert (plain["bmm1_scale"], plain["bmm2_scale"]) == (0.125, 1.0)
    for call in calls:
        assert call["block_tables"].shape == (3, 5) and call["seq_lens"].dtype == torch.uint32
        assert call["max_seq_len"] == 80 and call["window_left"] == 23


class _Wrapper:
    """A stand-in FlashInfer wrapper: records its plans and runs; `run` returns ones (rows it attended are 1)."""

    made: list[_Wrapper] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.plans: list[tuple[Any, ...]] = []
        self.runs = 0
        _Wrapper.made.append(self)

    def plan(self, *args: Any, **kwargs: Any) -> None:
        self.plans.append(args)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None,
            **kwargs: Any) -> torch.Tensor:
        self.runs += 1
        return torch.ones_like(q) if out is None else out.fill_(1)


def test_a_planner_with_xqa_sends_decode_rows_to_xqa_and_prefill_rows_to_flashinfer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager step of two decode rows and a prefill chunk: XQA gets the two rows (their pages and lengths in its
    table), the prefill wrapper the chunk; no decode wrapper is made. Later eager steps refill those tables (new ones
    only for more decode rows than they hold); a CUDA-graph bucket's planner fills its fixed table in place for every
    step."""
    from nanoflow_fx.ops import flashinfer_attention
    from nanoflow_fx.ops.flashinfer_attention import FlashInferPlanner, _run

    class _Event:  # (a CPU build has no CUDA events; the planner records one per plan)
        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(flashinfer_attention, "_built_modules_patched", True)  # (nothing of FlashInfer's to load)
    calls = _stand_in_xqa(monkeypatch)
    package = sys.modules["flashinfer"]
    package.BatchPrefillWithPagedKVCacheWrapper = _Wrapper  # type: ignore[attr-defined]
    package.BatchDecodeWithPagedKVCacheWrapper = _Wrapper  # type: ignore[attr-defined]
    _Wrapper.made = []
    config = AttentionConfig(8, 2, 64, 0.125, 0, 0.0)
    cpu = torch.device("cpu")
    planner = FlashInferPlanner([config], 16, torch.float16, cpu, kv_dtype=E4M3, xqa_width=6)
    assert len(_Wrapper.made) == 1  # the prefill wrapper only
    i32: dict[str, Any] = dict(dtype=torch.int32)
    qo, kv_ptr = torch.tensor([0, 1, 2, 7], **i32), torch.tensor([0, 3, 4, 6], **i32)
    last, kv_indices = torch.tensor([5, 16, 9], **i32), torch.tensor([11, 4, 7, 2, 9, 3], **i32)
    plans = planner.plan_tables(qo, kv_ptr, last, kv_indices).plans[config]
    assert plans.num_decode == 2 and plans.xqa is not None
    assert plans.xqa.table[:, :3].tolist() == [[11, 4, 7], [2, 0, 0]] and plans.xqa.lengths.tolist() == [37, 16]
    prefill = _Wrapper.made[0]
    assert len(prefill.plans) == 1 and prefill.plans[0][2].tolist() == [9, 3]  # the chunk's pages
    out = _run(plans, config, torch.full((7, 8, 64), 2.0, dtype=torch.float16),
               torch.zeros(12, 2, 16, 2, 64, dtype=E4M3))
    assert len(calls) == 1 and calls[0]["query"].shape[0] == 2 and prefill.runs == 1
    assert not out[:2].any() and bool((out[2:] == 1).all())  # (XQA's stand-in wrote zeros, the wrapper ones)
    tables = plans.xqa  # a later eager step with one decode row reuses them, one with three grows them
    plans = planner.plan_tables(torch.tensor([0, 1, 5], **i32), torch.tensor([0, 2, 4], **i32),
                                torch.tensor([7, 9], **i32), torch.tensor([8, 1, 9, 3], **i32)).plans[config]
    assert plans.xqa is tables and tables.table[0, :3].tolist() == [8, 1, 0] and int(tables.lengths[0]) == 23
    plans = planner.plan_tables(torch.arange(4, **i32), torch.tensor([0, 1, 2, 3], **i32),
                                torch.tensor([2, 3, 4], **i32), torch.tensor([5, 6, 7], **i32)).plans[config]
    assert plans.xqa is not None and plans.xqa.rows == 3 and plans.xqa.table[:, 0].tolist() == [5, 6, 7]
    assert plans.xqa.lengths.tolist() == [2, 3, 4]

    graph = FlashInferPlanner([config], 16, torch.float16, cpu, decode_batch=3, max_pages=8, kv_dtype=E4M3,
                              xqa_width=6)
    tables = graph.plans[config].xqa
    assert tables is not None and tables.table.shape == (3, 6)
    for step in ([1, 2, 3], [2, 1, 1]):
        ptr = torch.tensor([0, *torch.tensor(step).cumsum(0).tolist()], **i32)
        graph.plan_tables(torch.arange(4, **i32), ptr, torch.tensor([3, 3, 3], **i32), torch.arange(8, **i32))
        assert graph.plans[config].xqa is tables  # (the captured launch's buffers)
        assert tables.lengths.tolist() == [16 * (n - 1) + 3 for n in step]


def test_every_configuration_of_a_planner_reads_one_xqa_table_filled_once_per_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables hold the step's pages, which every layer's configuration shares: a model with sliding-window and
    global layers fills one table per step, not one per configuration (eager and CUDA-graph planners alike)."""
    from nanoflow_fx.ops import flashinfer_attention
    from nanoflow_fx.ops.flashinfer_attention import FlashInferPlanner

    class _Event:
        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(flashinfer_attention, "_built_modules_patched", True)
    _stand_in_xqa(monkeypatch)
    package = sys.modules["flashinfer"]
    package.BatchPrefillWithPagedKVCacheWrapper = _Wrapper  # type: ignore[attr-defined]
    package.BatchDecodeWithPagedKVCacheWrapper = _Wrapper  # type: ignore[attr-defined]
    fills: list[xqa.XqaTables] = []
    fill = xqa.XqaTables.fill
    monkeypatch.setattr(xqa.XqaTables, "fill", lambda self, *a: (fills.append(self), fill(self, *a))[1])
    configs = [AttentionConfig(8, 2, 64, 0.125, 0, 0.0), AttentionConfig(8, 2, 64, 0.125, 24, 0.0)]
    cpu, i32 = torch.device("cpu"), torch.int32
    eager = FlashInferPlanner(configs, 16, torch.float16, cpu, kv_dtype=E4M3, xqa_width=6)
    graph = FlashInferPlanner(configs, 16, torch.float16, cpu, decode_batch=2, max_pages=8, kv_dtype=E4M3,
                              xqa_width=6)
    for planner, qo in ((eager, [0, 1, 2, 7]), (graph, [0, 1, 2])):
        rows = len(qo) - 1
        for _ in range(2):
            fills.clear()
            planner.plan_tables(torch.tensor(qo, dtype=i32), torch.tensor([0, 3, 4, 6][:rows + 1], dtype=i32),
                                torch.tensor([5, 16, 9][:rows], dtype=i32),
                                torch.tensor([11, 4, 7, 2, 9, 3], dtype=i32))
            tables = [planner.plans[c].xqa for c in configs]
            assert tables[0] is not None and tables[0] is tables[1] and fills == [tables[0]]
            assert tables[0].table[:2, :3].tolist() == [[11, 4, 7], [2, 0, 0]]

def test_fp8_attention_needs_an_fp8_cache_and_says_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="needs kv_cache_dtype='fp8_e4m3'"):
        nanoflow_fx.NanoFlowConfig(fp8_attention=True)
    with pytest.raises(ValueError, match="True or False"):
        nanoflow_fx.NanoFlowConfig(kv_cache_dtype="fp8_e4m3", fp8_attention="yes")  # type: ignore[arg-type]
    model = build("llama")
    config = nanoflow_fx.NanoFlowConfig(kv_cache_dtype="fp8_e4m3", fp8_attention=True, num_pages=64,
                                        max_batch_size=4, max_seq_len=128)
    with pytest.raises(NanoFlowError, match="fp8_attention=True cannot run here: the 'torch' attention backend"):
        nanoflow_fx.optimize(model, config)
    assert not hasattr(model, "nanoflow")
    configs = [AttentionConfig(8, 2, 64, 0.125, 0, 0.0)]
    cpu = torch.device("cpu")
    assert "fp8_attention needs 'flashinfer'" in xqa.unavailable_reason("triton", configs, 16, cpu, E4M3)
    assert "kv_cache_dtype='fp8_e4m3'" in xqa.unavailable_reason("flashinfer", configs, 16, cpu, torch.bfloat16)
    assert "runs on CUDA" in xqa.unavailable_reason("flashinfer", configs, 16, cpu, E4M3)


# ------------------------------------------------------------------------------------------------------------ GPU
def _xqa_runs() -> bool:
    return torch.cuda.is_available() and not xqa.unavailable_reason(
        "flashinfer", [AttentionConfig(4, 2, 64, 0.125, 0, 0.0)], 16, torch.device("cuda"), E4M3)


needs_xqa = pytest.mark.skipif(not _xqa_runs(), reason="needs FlashInfer >= 0.5 (XQA) on a Hopper GPU")


@pytest.mark.cuda
@needs_xqa
@pytest.mark.parametrize("window", [0, 24])
def test_gpu_xqa_decode_is_within_e4m3_rounding_of_the_dequantised_cache(window: int) -> None:
    """fp16 queries (the engine's over e4m3) of decode rows over an e4m3 cache with non-trivial scales, through a
    FlashInfer planner with XQA, eager and as a CUDA-graph bucket: within 2^-4 of the largest output of fp32
    attention over the dequantised cache. XQA rounds q and the softmax probabilities to e4m3 (3 mantissa bits:
    relative rounding 2^-4 each); a wrong page, length, scale or window is off by the output's own size."""
    from nanoflow_fx.ops.backend import get
    from nanoflow_fx.ops.reference import paged_attention_reference
    from tests.test_fp8_kv import _paged_kv, _to_fp8

    gen = torch.Generator().manual_seed(window)
    heads_kv, group, dim, page = 2, 2, 64, 16
    kv_lens = [300, 17, 130, 64, 1, 33]
    cache, k, v, (kvp, kvi, last) = _paged_kv(gen, page, heads_kv, dim, kv_lens)
    qo = torch.arange(len(kv_lens) + 1, dtype=torch.int32)
    q = torch.randn(len(kv_lens), heads_kv * group, dim, generator=gen)
    kv_scale = torch.tensor([k.abs().max() * 2 / 448, v.abs().max() * 0.5 / 448])
    stored, dequantised = _to_fp8(cache, kv_scale)
    scaling = dim**-0.5
    want = paged_attention_reference(q, dequantised, qo, kvp, kvi, last, scaling, window, 0.0)
    cuda = torch.device("cuda")
    meta = [t.to(cuda) for t in (qo, kvp, kvi, last)]
    q16, stored, kv_scale = q.to(cuda, torch.float16), stored.to(cuda), kv_scale.to(cuda)
    config = AttentionConfig(heads_kv * group, heads_kv, dim, scaling, window, 0.0)
    kernel = get("flashinfer")
    host = (float(kv_scale[0]), float(kv_scale[1]))
    outputs = []
    for decode_batch, scale_values in ((None, lambda _: host), (None, None), (len(kv_lens), lambda _: host)):
        planner = kernel.make_planner([config], page, torch.float16, cuda, decode_batch=decode_batch,
                                      max_pages=kvi.shape[0], kv_dtype=E4M3, scale_values=scale_values, xqa_width=24)
        plan = planner.plan_tables(qo.pin_memory(), kvp.pin_memory(), last.pin_memory(), meta[2])
        assert plan.plans[config].xqa is not None
        outputs.append(kernel.run_planned(plan, config, q16, stored, meta, None, kv_scale))
    for got in (out.float().cpu() for out in outputs):
        assert (got - want).abs().max().item() <= 2**-4 * want.abs().max().item()


@pytest.mark.cuda
@needs_xqa
def test_gpu_engine_with_xqa_replays_graphs_equal_to_its_eager_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine with fp8_attention (CUDA graphs on, every decode bucket hit, the scales set after capture: its
    graphs are captured again) against the same engine with graphs off: within bf16 rounding step by step (both
    run XQA; graph steps are padded to their buckets), and XQA ran."""
    from tests.test_gpu_backends import _model, assert_fp8_streams_agree

    launches = []
    run = xqa.run
    monkeypatch.setattr(xqa, "run", lambda *a, **kw: launches.append(1) or run(*a, **kw))
    eager, fast = [_model("llama", "flashinfer", graphs=graphs, kv_cache_dtype="fp8_e4m3", fp8_attention=True)
                   for graphs in (False, True)]
    assert_fp8_streams_agree(eager, fast)
    assert launches


def _decode_perplexity(model: torch.nn.Module, windows: list[list[int]], prefix: int) -> tuple[float, torch.Tensor]:
    """Perplexity per byte of `model` (optimized) predicting each window's bytes after the first `prefix` through
    decode steps (the prefix prefilled, then every byte fed as the next decode token, teacher-forced), and the
    predictions' argmax [windows, length - prefix]."""
    from tests.steps import admit, release, run, stream_chunks

    runner = model.nanoflow.runner
    requests = admit(runner, [w[:prefix] for w in windows], max_new_tokens=len(windows[0]))
    logits = torch.zeros(len(windows), len(windows[0]) - prefix, 256)
    try:
        for t in range(prefix, len(windows[0])):
            chunks = stream_chunks(requests, model.nanoflow.config.max_num_tokens)
            rows = run(runner, chunks, all_logits=False).float().cpu()
            for row, chunk in zip(rows, [c for c in chunks if c.completes]):
                i = requests.index(chunk.request)
                logits[i, t - prefix] = row
                chunk.request.output.append(windows[i][t])  # (teacher-forced: the text's byte is fed next)
    finally:
        release(runner, requests)
    targets = torch.tensor([w[prefix:] for w in windows])
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    return math.exp(nll), logits.argmax(-1)


@pytest.mark.cuda
@needs_xqa
def test_gpu_fp8_attention_keeps_a_trained_models_decode_perplexity_within_one_percent() -> None:
    """The trained byte-level Llama (tests/trained_model.py; head_dim 64 here, as FlashInfer takes) in bf16 on the
    GPU, 24 held-out windows of 64 bytes, 8 prefilled and 56 predicted by decode steps (CUDA graphs): its decode
    perplexity over an FP8 cache with XQA's FP8 arithmetic within 1% of the bf16 engine's (the FP8 KV cache's
    bound), as the FP8 cache with 16-bit arithmetic is. Printed: every perplexity and next-byte agreement."""
    from tests.trained_model import RECIPE, Recipe, heldout_windows, trained_llama

    recipe = Recipe(num_attention_heads=2, num_key_value_heads=1)  # (head_dim 64)
    windows = heldout_windows(24, RECIPE.window, recipe)
    results = {}
    for name, fp8 in (("bf16", {}), ("fp8 kv", {"kv_cache_dtype": "fp8_e4m3"}),
                      ("fp8 kv + xqa", {"kv_cache_dtype": "fp8_e4m3", "fp8_attention": True})):
        model = trained_llama(recipe).to("cuda", torch.bfloat16)
        config = nanoflow_fx.NanoFlowConfig(max_batch_size=32, max_seq_len=2 * recipe.window, page_size=16,
                                            num_pages=256, attention_backend="flashinfer", interim_attention=False,
                                            **fp8)
        results[name] = _decode_perplexity(nanoflow_fx.optimize(model, config), windows, prefix=8)
        assert model.nanoflow.runner.stats["graph_steps"] > 0
    base, base_top = results["bf16"]
    print({name: (round(ppl, 4), round((top == base_top).float().mean().item(), 4))
           for name, (ppl, top) in results.items()})
    assert base < 12  # (the trained model predicts the text: a uniform guess is 256)
    for name in ("fp8 kv", "fp8 kv + xqa"):
        assert abs(results[name][0] / base - 1) <= 0.01, (name, results)

"""Offline serving throughput on a Llama-3-8B-shaped model (random bf16 weights; `--shape llama3-70b --fp8-build`:
the 70B shape with its linears made in FP8), every row in ONE process.

    python3 -m benchmarks.bench_offline --workloads 1024x512 512x512 chat --requests 256 --hf-requests 64

Workloads (greedy, EOS off: every request generates exactly its output length):
  - "PxN": constant P prompt tokens and N new tokens (1024x512 is NanoFlow's offline workload);
  - "chat": prompt and output lengths drawn log-normally (seeded): prompt median 256 (sigma 0.8, clipped to
    [16, 2048]), output median 160 (sigma 0.8, clipped to [8, 1024]).
Rows per workload:
  - transformers `generate_batch` at its defaults (optional, `--hf-requests` of the requests: it is ~20x slower);
  - nanoflow_fx static batches: `generate()` on `--static-batch` requests at a time, each call waiting for its
    longest row;
  - nanoflow_fx engine: every request through the continuous-batching manager at once.
Per row: total (prompt + generated) and output tokens/s, % of the compute optimum (2 x parameters FLOPs per token,
at the layer-GEMM rate measured in this run and at the device's spec peak), mean running batch, mean KV-cache use,
preemptions. Then a steady-state window of the engine (1024x512 mix in flight) is profiled: wall time per step
against the GPU's kernel time per step (host work hidden when the two agree). JSON (--out) and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig

import nanoflow_fx
from benchmarks.common import build_model, print_markdown_table

SPEC_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16, SXM (vendor datasheets; dense FP8: twice)


def workload(name: str, count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt, new tokens) per request."""
    gen = torch.Generator().manual_seed(seed)
    if name == "chat":
        prompt_lens = torch.empty(count).log_normal_(math.log(256), 0.8, generator=gen).clamp(16, 2048).long()
        output_lens = torch.empty(count).log_normal_(math.log(160), 0.8, generator=gen).clamp(8, 1024).long()
    else:
        p, n = (int(x) for x in name.split("x"))
        prompt_lens, output_lens = torch.full((count,), p), torch.full((count,), n)
    return [(torch.randint(3, vocab, (int(p),), generator=gen).tolist(), int(n))
            for p, n in zip(prompt_lens, output_lens)]


def gemm_rate(model: Any, tokens: int = 2048, fp8: bool = False) -> float:
    """FLOP/s of one decoder layer's GEMMs (fused Q/K/V, O, gate/up, down) at `tokens` rows: bf16, or with `fp8`
    e4m3 operands quantised beforehand (row-wise scales, fast accumulation, bf16 out: FP8 linears' GEMM)."""
    from nanoflow_fx.ops.fp8 import quantize_rows, scaled_linear

    c = model.config
    head = c.hidden_size // c.num_attention_heads
    shapes = [(c.hidden_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * head),
              (c.num_attention_heads * head, c.hidden_size), (c.hidden_size, 2 * c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    pairs = [(torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16),
              torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for k, n in shapes]
    if fp8:
        quantised = [(quantize_rows(a), quantize_rows(w)) for a, w in pairs]
        gemms = [lambda a=a, w=w: scaled_linear(*a, *w, None, torch.bfloat16, use_fast_accum=True)
                 for a, w in quantised]
    else:
        gemms = [lambda a=a, w=w: a @ w.t() for a, w in pairs]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    for gemm in gemms:
        gemm()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        for gemm in gemms:
            gemm()
    torch.cuda.synchronize()
    return flops * 20 / (time.perf_counter() - start)


GREEDY_NO_EOS = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)  # -1: no EOS (transformers' own)


def run_manager(model: Any, requests: list[tuple[list[int], int]]) -> float:
    """All requests through `model.init_continuous_batching()` (transformers' or ours); returns seconds."""
    manager = model.init_continuous_batching(GREEDY_NO_EOS)
    manager.start()
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        expected = {manager.add_request(prompt, max_new_tokens=new): new for prompt, new in requests}
        while expected:
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("no result within 600 s")
            if result.is_finished():
                want = expected.pop(result.request_id)
                if result.error or len(result.generated_tokens) != want:
                    raise RuntimeError(f"{result.request_id}: {result.error or len(result.generated_tokens)} tokens, "
                                       f"expected {want}")
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
        if hasattr(manager, "destroy"):
            manager.destroy()
    return seconds


def run_static(model: Any, requests: list[tuple[list[int], int]], batch: int) -> float:
    """`generate()` on `batch` requests at a time (left-padded; each call runs to its longest row)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(requests), batch):
        group = requests[first : first + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        new = max(n for _, n in group)
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
        assert out.shape[1] == width + new
    torch.cuda.synchronize()
    return time.perf_counter() - start


def row(case: str, name: str, requests: list[tuple[list[int], int]], seconds: float, optimum: dict,
        stats: dict | None = None) -> dict:
    prompt = sum(len(p) for p, _ in requests)
    output = sum(n for _, n in requests)
    total_rate = (prompt + output) / seconds
    result = dict(workload=name, case=case, requests=len(requests), seconds=seconds,
                  total_tok_s=total_rate, output_tok_s=output / seconds,
                  pct_optimum_measured=100 * total_rate / optimum["measured"],
                  pct_optimum_spec=100 * total_rate / optimum["spec"], **(stats or {}))
    print(f"[measured] {result}", flush=True)
    return result


def engine_stats(model: Any, before: Any) -> dict:
    stats = model.nanoflow.engine.stats
    steps = stats.steps - before.steps
    pages = model.nanoflow.kv_cache.allocator.num_pages
    return dict(steps=steps, mean_running=(stats.running_sum - before.running_sum) / max(steps, 1),
                kv_use_pct=100 * (stats.kv_pages_used_sum - before.kv_pages_used_sum) / max(steps, 1) / pages,
                preemptions=stats.preemptions - before.preemptions, kv_pages=pages)


def steady_state(model: Any, requests: list[tuple[list[int], int]], steps: int = 30) -> dict:
    """Wall time per engine step against GPU kernel time per step, in steady state (a full table in flight)."""
    from nanoflow_fx.runtime.sampling import SamplingParams

    engine = model.nanoflow.engine
    params = SamplingParams(False, 1.0, 0, 1.0, (), 0)
    live = [engine.add_request(p, params, n) for p, n in requests]
    for _ in range(3 * len(requests[0][0]) // max(model.nanoflow.config.max_num_tokens, 1) + 40):
        engine.step()  # fill the table: prefills under way, decodes running
    torch.cuda.synchronize()
    stats = engine.stats
    step_s, wait_s, plan_s = stats.step_s, stats.readback_wait_s, model.nanoflow.runner.planner_wait_s
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    waits = (stats.readback_wait_s - wait_s) + (model.nanoflow.runner.planner_wait_s - plan_s)
    host_ms = ((stats.step_s - step_s) - waits) / steps * 1e3  # host work, not counting waits for the device
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # a second window: the profiler's own cost aside
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / steps
    running = len(engine.running)
    for req in live:
        engine.cancel(req)
    while engine.inflight:
        engine.step()
    return dict(steady_wall_ms_per_step=wall_ms, steady_gpu_ms_per_step=gpu_ms, steady_host_ms_per_step=host_ms,
                steady_running=running, wall_over_gpu_pct=100 * (wall_ms / gpu_ms - 1))


def _flashinfer_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("flashinfer-python")
    except Exception:  # noqa: BLE001 - not installed
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["1024x512", "512x512", "chat"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=0, help="requests for transformers' generate_batch")
    parser.add_argument("--hf-workloads", nargs="*", default=None, help="workloads of the transformers row (all)")
    parser.add_argument("--static-batch", type=int, default=128)
    parser.add_argument("--config", default="{}", help="NanoFlowConfig fields as JSON (defaults otherwise)")
    parser.add_argument("--no-static", action="store_true")
    parser.add_argument("--shape", default="llama3-8b", help="benchmarks.common.SHAPES")
    parser.add_argument("--layers", type=int, default=None, help="the shape's first N layers (all by default)")
    parser.add_argument("--fp8-build", action="store_true",
                        help="make the linears FP8 directly (no full-precision model ever: a 70B shape fits an H200)")
    parser.add_argument("--log-level", default="WARNING", help="nanoflow_fx's log level (INFO: the KV cache's sizing)")
    parser.add_argument("--out", default="bench_offline.json")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("nanoflow_fx").setLevel(args.log_level.upper())
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args.shape, "cuda", torch.bfloat16, fp8_linears=args.fp8_build, num_layers=args.layers)
    torch.cuda.empty_cache()  # (what stays reserved beyond the allocated: blocks the build left in shared segments)
    built = dict(allocated=torch.cuda.memory_allocated() / 2**30, reserved=torch.cuda.memory_reserved() / 2**30)
    params = sum(p.numel() for p in model.parameters())
    fp8 = args.fp8_build or json.loads(args.config).get("linear_dtype") == "fp8_e4m3"
    rate = gemm_rate(model, fp8=fp8)  # (the optimum: the rate of the GEMMs the step runs)
    device = torch.cuda.get_device_name()
    spec = next((v for k, v in SPEC_PEAK_FLOPS.items() if k in device), float("nan")) * (2 if fp8 else 1)
    optimum = dict(measured=rate / (2 * params), spec=spec / (2 * params))
    meta = dict(device=device, date=str(datetime.date.today()), torch=torch.__version__,
                transformers=transformers.__version__, shape=args.shape, layers=model.config.num_hidden_layers,
                params=params, gemm_tflops=rate / 1e12, gemm_dtype="fp8_e4m3" if fp8 else "bfloat16",
                optimum_tok_s=optimum, memory_after_build=built, args=vars(args),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), flashinfer=_flashinfer_version())
    print(f"[meta] {meta}", flush=True)
    rows: list[dict] = []
    loads = {name: workload(name, args.requests, model.config.vocab_size) for name in args.workloads}
    if args.hf_requests:
        model.set_attn_implementation("sdpa")
        for name, requests in loads.items():
            if args.hf_workloads is not None and name not in args.hf_workloads:
                continue
            subset = requests[: args.hf_requests]
            rows.append(row("transformers generate_batch (defaults)", name, subset, run_manager(model, subset),
                            optimum))
            gc.collect()
            torch.cuda.empty_cache()
    config = nanoflow_fx.NanoFlowConfig.from_dict(json.loads(args.config))
    t0 = time.perf_counter()
    nanoflow_fx.optimize(model, config)
    optimize_s = time.perf_counter() - t0
    model.nanoflow.wait_until_ready()  # time the chosen attention backend, not the interim kernel
    meta.update(optimize_s=optimize_s, timings=model.nanoflow.timings,
                config=model.nanoflow.config.to_dict(), process_to_optimized_s=time.perf_counter() - start,
                attention=model.nanoflow.attention_backend.name,
                cuda_graphs_off_reason=model.nanoflow.runner.cuda_graphs_off_reason,
                schedule_search=[dict(shape=vars(t.shape), chosen=t.chosen.label(), seconds=round(t.seconds, 1),
                                      measured_ms={c.label(): round(ms, 3) for c, ms in t.measured})
                                 for t in model.nanoflow.tunings],
                memory=memory_use(model))
    print(f"[memory] {meta['memory']}", flush=True)
    print(f"[optimized] {meta['optimize_s']:.1f} s {meta['timings']} config {meta['config']}", flush=True)
    for name, requests in loads.items():
        if not args.no_static:
            before = _copy(model.nanoflow.engine.stats)
            seconds = run_static(model, requests, args.static_batch)
            rows.append(row(f"nanoflow_fx static generate() batches of {args.static_batch}", name, requests,
                            seconds, optimum, engine_stats(model, before)))
        before = _copy(model.nanoflow.engine.stats)
        seconds = run_manager(model, requests)
        rows.append(row("nanoflow_fx engine", name, requests, seconds, optimum, engine_stats(model, before)))
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    steady_load = workload("1024x512", args.requests, model.config.vocab_size, seed=1)
    meta["steady_state"] = steady_state(model, steady_load)
    print(f"[steady] {meta['steady_state']}", flush=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print_table(meta, rows)


def memory_use(model: Any) -> dict[str, float]:
    """GiB of the GPU's memory once optimized: the model's own tensors (its parameters and buffers: a fused
    linear's weights may be held by the step instead), the KV cache, what torch's allocator holds (allocated,
    reserved) and what the driver reports used, of its total."""
    gib = 2**30
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if t.is_cuda}
    free, total = torch.cuda.mem_get_info()
    return dict(model_tensors=sum(tensors.values()) / gib, kv_cache=model.nanoflow.kv_cache.num_bytes / gib,
                allocated=torch.cuda.memory_allocated() / gib, reserved=torch.cuda.memory_reserved() / gib,
                driver_used=(total - free) / gib, total=total / gib)


def _copy(stats: Any) -> Any:
    import dataclasses

    return dataclasses.replace(stats)


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta['device']}, {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}; "
          f"{meta['shape']} x {meta['layers']} layers; layer GEMMs ({meta['gemm_dtype']}) {meta['gemm_tflops']:.0f} "
          f"TFLOP/s; optimum {meta['optimum_tok_s']['measured']:,.0f} tok/s "
          f"(measured rate), {meta['optimum_tok_s']['spec']:,.0f} (spec peak)")
    print_markdown_table([
        ("workload", lambda r: f"{r['workload']}"), ("case", lambda r: f"{r['case']}"),
        ("requests", lambda r: f"{r['requests']}"), ("total tok/s", lambda r: f"{r['total_tok_s']:,.0f}"),
        ("output tok/s", lambda r: f"{r['output_tok_s']:,.0f}"),
        ("% optimum (measured / spec)", lambda r: f"{r['pct_optimum_measured']:.0f}% / {r['pct_optimum_spec']:.0f}%"),
        ("mean running", lambda r: f"{r.get('mean_running', float('nan')):.0f}"),
        ("KV use", lambda r: f"{r.get('kv_use_pct', float('nan')):.0f}%"),
        ("preemptions", lambda r: f"{r.get('preemptions', '-')}"),
    ], rows)


if __name__ == "__main__":
    main()

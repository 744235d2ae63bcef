"""Where a decode step's time goes, Llama-3-8B shape, bf16: GPU time of the step alone, each host phase, the
whole loop, and (with --kernels) the CUDA kernel table from torch.profiler.

    python3 -m benchmarks.profile_decode --batch-size 64 --context 512 [--backends auto] [--inductor off on]
        [--kernels] [--out profile.json]

Each (backend, inductor) variant is optimized and profiled in turn on the same model, in one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import nanoflow_fx
from benchmarks.common import build_model
from nanoflow_fx.runtime import Chunk, Request, schedule
from nanoflow_fx.runtime.batch import build_step
from nanoflow_fx.runtime.sampling import SamplingParams

GREEDY = SamplingParams(False, 1.0, 0, 1.0, (), 0)


def gpu_ms(fn, repeats: int = 20) -> float:
    """Mean GPU time of fn() between CUDA events (the host enqueues all repeats before waiting)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def host_ms(fn, repeats: int = 20) -> float:
    """Mean wall time of fn() with a device sync after each call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=["auto"])
    parser.add_argument("--kernels", action="store_true", help="print torch.profiler's kernel table")
    parser.add_argument("--inductor", nargs="+", default=["off"], choices=["off", "on"],
                        help="without and/or with Inductor-compiled pieces between attention calls")
    parser.add_argument("--fuse-linears", nargs="+", default=["on"], choices=["on", "off"],
                        help="with and/or without Q/K/V and gate/up fused into one GEMM each")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    results = []
    for backend in args.backends:
        for inductor in args.inductor:
            for fuse in args.fuse_linears:
                results.append(profile_variant(model, args, backend, inductor == "on", fuse == "on"))
                for name in ("nanoflow", "generate", "generate_batch", "init_continuous_batching"):
                    model.__dict__.pop(name, None)  # free the KV cache and graphs before the next variant
                gc.collect()
                torch.cuda.empty_cache()
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=2))


def profile_variant(model, args: argparse.Namespace, backend: str, inductor: bool, fuse: bool) -> dict:
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=args.batch_size, max_seq_len=args.context + 64,
                                        num_pages=args.batch_size * -(-(args.context + 64) // 16),
                                        attention_backend=backend, inductor=inductor, fuse_linears=fuse,
                                        check_capture=False)  # profiling only; correctness is the tests' job
    start = time.perf_counter()
    nanoflow_fx.optimize(model, config)
    optimize_s = time.perf_counter() - start
    model.nanoflow.wait_until_ready()  # time the chosen attention backend, not the interim kernel
    runner = model.nanoflow.runner
    cache = runner.kv_cache
    requests = [Request(f"r{i}", [5] * args.context, GREEDY, 64, slot=i) for i in range(args.batch_size)]
    for req in requests:
        req.pages = cache.allocator.allocate(cache.pages_for(args.context + 64))
    per_chunk = max(1, model.nanoflow.config.max_num_tokens // args.context)
    for first in range(0, args.batch_size, per_chunk):  # prefill
        group = requests[first : first + per_chunk]
        runner.run([Chunk(r, args.context) for r in group])
        for r in group:
            r.num_cached = args.context
            r.output.append(7)
    torch.cuda.synchronize()
    chunks = [Chunk(r, 1) for r in requests]  # replayed at the same position: timing only
    result = dict(batch=args.batch_size, context=args.context, backend=runner.backend.name,
                  inductor=inductor, fuse_linears=fuse, optimize_s=optimize_s, **model.nanoflow.timings,
                  cuda_graphs=runner.cuda_graphs is not None, off_reason=runner.cuda_graphs_off_reason)

    def run_step() -> None:
        runner.run(chunks)

    shape = runner.cuda_graphs.shape_for(args.batch_size, args.batch_size) if runner.cuda_graphs else None
    result["runner_run_enqueue_gpu_ms"] = gpu_ms(run_step)
    result["runner_run_synced_ms"] = host_ms(run_step)
    start = time.perf_counter()
    for _ in range(20):
        run_step()
    result["runner_run_host_ms"] = (time.perf_counter() - start) / 20 * 1e3  # host time to enqueue a step
    torch.cuda.synchronize()
    if shape is not None:  # the bucket's static inputs now hold this decode step (and its FlashInfer plan)
        entry = runner.cuda_graphs.graphs[shape]
        result["graph_replay_gpu_ms"] = gpu_ms(entry.graph.replay)
    start = time.perf_counter()
    for _ in range(20):
        build_step(chunks, cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                   backend=runner.backend.name, shape=shape)
    result["host_build_step_ms"] = (time.perf_counter() - start) / 20 * 1e3
    limits = model.nanoflow.engine.limits
    start = time.perf_counter()
    for _ in range(20):
        schedule(requests, [], cache.allocator.num_free, limits)
    result["host_schedule_ms"] = (time.perf_counter() - start) / 20 * 1e3

    def full_step() -> None:  # what the engine does per step, but for the readback's lag
        plan = schedule(requests, [], cache.allocator.num_free, limits)
        logits = runner.run(plan.chunks)
        tokens = logits.argmax(-1)
        runner.record_tokens([r.slot for r in requests], tokens)
        tokens.tolist()

    result["loop_step_ms"] = host_ms(full_step)
    print(f"=== {runner.backend.name} attention, inductor {inductor}, fuse_linears {fuse}")
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}", flush=True)
    if args.kernels:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                full_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return result


if __name__ == "__main__":
    main()

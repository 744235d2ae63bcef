"""Where `generate()`'s time goes per decode step, Llama-3-8B shape, bf16, prompt 128 + 128 new tokens: the
step time through generate() (three runs: run-to-run stability) against the CUDA-graph replay of the same decode
step and the GPU's kernel time per decode step, the engine's host time per step, and a cProfile of the host.
Target: a decode step through generate() within 10% of its graph replay (`decode_step_over_replay`: the second
half's steps, all pure decodes, against the replay at the final context, the slowest of them).

    python3 -m benchmarks.profile_generate [--batch-sizes 64 256] [--out $OUT/profile_generate.json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import nanoflow_fx
from benchmarks.common import build_model


def timed(model: Any, ids: torch.Tensor, new: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def step_ms(model: Any, ids: torch.Tensor, new: int) -> dict[str, float]:
    """Mean decode step of generate(): (t(new) - t(1)) / (new - 1), with the engine's host counters over it; and
    `decode_step_ms`, (t(new) - t(new / 2)) / (new / 2): the steps of the second half only, all pure decode steps
    (the prefill and the mixed steps where early requests decode beside later prompts' chunks cancel out)."""
    engine, runner = model.nanoflow.engine, model.nanoflow.runner
    t_one = timed(model, ids, 1)
    t_half = timed(model, ids, new // 2)
    before = (engine.stats.steps, engine.stats.step_s, engine.stats.readback_wait_s, dict(runner.stats))
    with gc_watch() as collections:
        t_all = timed(model, ids, new)
    steps = engine.stats.steps - before[0]
    return dict(step_ms=(t_all - t_one) / (new - 1) * 1e3, decode_step_ms=(t_all - t_half) / (new - new // 2) * 1e3,
                steps=steps, gc=collections,
                host_in_step_ms=(engine.stats.step_s - before[1]) / steps * 1e3,
                readback_wait_ms=(engine.stats.readback_wait_s - before[2]) / steps * 1e3,
                graph_steps=runner.stats["graph_steps"] - before[3]["graph_steps"],
                eager_steps=runner.stats["eager_steps"] - before[3]["eager_steps"])


@contextlib.contextmanager
def gc_watch() -> Any:
    """Python's garbage collections while the block runs: per generation, how many and their total ms (a full
    collection walks every object the process holds: with a model and its compiled code loaded, long pauses)."""
    seen: dict[str, list[float]] = {}
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            entry = seen.setdefault(f"gen{info['generation']}", [0, 0.0])
            entry[0] += 1
            entry[1] += (time.perf_counter() - started.pop()) * 1e3

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def host_phases(model: Any, ids: torch.Tensor, new: int) -> dict[str, float]:
    """Host ms per step in each phase of generate()'s steps (one more call, its functions wrapped with timers):
    the scheduler, packing the step, FlashInfer's plan, the graph launch, sampling, reading tokens back."""
    from nanoflow_fx.runtime import cuda_graphs
    from nanoflow_fx.runtime import engine as engine_module

    totals: dict[str, float] = {}
    patches: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        patches.append((owner, name, original))
        setattr(owner, name, timed_call)

    engine = model.nanoflow.engine
    wrap(engine_module, "schedule", "schedule")
    wrap(cuda_graphs, "build_step", "build_step (graph steps)")
    wrap(torch.cuda.CUDAGraph, "replay", "graph launch")
    wrap(engine_module, "sample_rows", "sampling")
    wrap(engine, "_resolve_oldest", "readback (incl. waiting)")
    wrap(engine.runner, "run", "runner.run (all)")
    try:
        from nanoflow_fx.ops.flashinfer_attention import FlashInferPlanner
        wrap(FlashInferPlanner, "plan_tables", "flashinfer plan")
    except ImportError:
        pass
    steps = engine.stats.steps
    try:
        timed(model, ids, new)
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
    steps = engine.stats.steps - steps
    return {label: seconds / steps * 1e3 for label, seconds in totals.items()}


def kernel_ms(model: Any, ids: torch.Tensor, new: int) -> float:
    """GPU kernel time of one generate() call (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3


def replay_ms(model: Any, batch: int, repeats: int = 20) -> float | None:
    """GPU time of one replay of the decode graph `batch` requests use, on the inputs of the last step it ran
    (the end of the last generate(): its requests' final context), between CUDA events."""
    graphs = model.nanoflow.runner.cuda_graphs
    shape = graphs.shape_for(batch, batch) if graphs is not None else None
    if shape is None:
        return None
    graph = graphs.graphs[shape].graph
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def host_profile(model: Any, ids: torch.Tensor, new: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_generate.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=max(args.batch_sizes),
                                        max_seq_len=args.prompt_len + args.new_tokens)
    start = time.perf_counter()
    nanoflow_fx.optimize(model, config)
    model.nanoflow.wait_until_ready()
    results: dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   optimize_s=time.perf_counter() - start,
                                   backend=model.nanoflow.runner.backend.name, cases=[])
    for batch in args.batch_sizes:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
        timed(model, ids, 8)  # warm-up
        runs = [step_ms(model, ids, args.new_tokens) for _ in range(3)]
        phases = host_phases(model, ids, args.new_tokens)
        replay = replay_ms(model, batch)  # at the context the last run ended with
        # kernel time of a decode step: of generate(N) less generate(1) (the prefill), per added step
        kernels = (kernel_ms(model, ids, 33) - kernel_ms(model, ids, 1)) / 32
        case = dict(batch=batch, runs=runs, graph_replay_ms_at_end=replay, kernel_ms_per_decode_step=kernels,
                    host_phases_ms_per_step=phases,
                    step_over_replay=[r["step_ms"] / replay for r in runs] if replay else None,
                    decode_step_over_replay=[r["decode_step_ms"] / replay for r in runs] if replay else None,
                    step_over_kernels=[r["step_ms"] / kernels for r in runs],
                    tokens_per_s=[batch / r["step_ms"] * 1e3 for r in runs])
        print(json.dumps(case, indent=1), flush=True)
        print(host_profile(model, ids, 32), flush=True)
        results["cases"].append(case)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

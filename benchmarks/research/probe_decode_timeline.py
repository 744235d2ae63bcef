"""Where a steady-state decode step of `generate()` spends its time, on the GPU's timeline and the host's.

Llama-3-8B shape, bf16, a short prompt and many new tokens (the steps are nearly all decodes). One torch.profiler
trace of the last `--window` steps of a generate() call: per step, the wall time between graph launches, the GPU's
busy time (the union of kernel intervals) and idle time, the kernels outside the decode graph (by name), and the
host's CUDA runtime calls that block (synchronisations) or last long. Then a cProfile of the same generate()
by cumulative time, restricted to nanoflow_fx's own functions (host time per step).

    python3 -m benchmarks.research.probe_decode_timeline [--batch-size 256 64] [--out $OUT/decode_timeline.json]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import nanoflow_fx
from benchmarks.common import build_model


def generate(model: Any, ids: torch.Tensor, new: int) -> None:
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    torch.cuda.synchronize()


def timeline(trace: dict[str, Any], window: int) -> dict[str, Any]:
    """Per-step figures over the last `window` graph launches of a chrome trace."""
    events = trace["traceEvents"]
    launches = sorted((e for e in events if e.get("name") == "cudaGraphLaunch"), key=lambda e: e["ts"])
    if len(launches) < window + 1:
        return dict(error=f"only {len(launches)} graph launches in the trace")
    graph_ids = {e["args"].get("correlation") for e in launches}
    first, last = launches[-window - 1], launches[-1]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    # the GPU span of the window: from the first kernel of the window's first launch to the last launch's end
    starts = [k["ts"] for k in kernels if k["args"].get("correlation") == first["args"].get("correlation")]
    ends = [k["ts"] + k["dur"] for k in kernels if k["args"].get("correlation") == last["args"].get("correlation")]
    if not starts or not ends:
        return dict(error="graph kernels not correlated to their launches in the trace")
    lo, hi = min(starts), max(ends)
    inside = [k for k in kernels if k["ts"] >= lo and k["ts"] + k["dur"] <= hi]
    busy, cursor = 0.0, lo
    for k in inside:
        begin, end = max(k["ts"], cursor), k["ts"] + k["dur"]
        if end > begin:
            busy += end - begin
            cursor = end
    steps = window
    outside: dict[str, list[float]] = collections.defaultdict(list)
    for k in inside:
        if k["args"].get("correlation") not in graph_ids:
            outside[k["name"][:90]].append(k["dur"])
    host_lo, host_hi = first["ts"], last["ts"]
    runtime: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cuda_runtime" and host_lo <= e["ts"] <= host_hi:
            runtime[e["name"]].append(e["dur"])
    memcpy = [e["dur"] for e in events if e.get("cat") == "gpu_memcpy" and lo <= e["ts"] <= hi]
    graph_kernel_us = sum(k["dur"] for k in inside if k["args"].get("correlation") in graph_ids)
    return dict(
        steps=steps,
        gpu_span_ms_per_step=(hi - lo) / 1e3 / steps,
        gpu_busy_ms_per_step=busy / 1e3 / steps,
        gpu_idle_ms_per_step=(hi - lo - busy) / 1e3 / steps,
        graph_kernel_ms_per_step=graph_kernel_us / 1e3 / steps,
        host_launch_to_launch_ms=(host_hi - host_lo) / 1e3 / (steps - 1 if steps > 1 else 1),
        kernels_outside_graph_ms_per_step={n: sum(d) / 1e3 / steps for n, d in
                                           sorted(outside.items(), key=lambda kv: -sum(kv[1]))[:15]},
        memcpy_ms_per_step=sum(memcpy) / 1e3 / steps, memcpy_per_step=len(memcpy) / steps,
        runtime_calls_per_step={n: dict(calls=len(d) / steps, ms=sum(d) / 1e3 / steps) for n, d in
                                sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:12]},
    )


def host_profile(model: Any, ids: torch.Tensor, new: int) -> str:
    engine = model.nanoflow.engine
    steps0 = engine.stats.steps
    pr = cProfile.Profile()
    pr.enable()
    generate(model, ids, new)
    pr.disable()
    out = io.StringIO()
    out.write(f"steps: {engine.stats.steps - steps0}\n")
    stats = pstats.Stats(pr, stream=out).sort_stats("cumulative")
    stats.print_stats(r"nanoflow_fx|flashinfer|cuda/graphs", 40)
    stats.sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--window", type=int, default=48)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode_timeline.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=max(args.batch_size),
                                        max_seq_len=args.prompt_len + args.new_tokens)
    nanoflow_fx.optimize(model, config)
    model.nanoflow.wait_until_ready()
    results: dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   backend=model.nanoflow.runner.backend.name, cases=[])
    for batch in args.batch_size:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
        generate(model, ids, 8)
        start = time.perf_counter()
        generate(model, ids, args.new_tokens)
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(model, ids, args.new_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            trace = json.loads(Path(path).read_text())
        case = dict(batch=batch, generate_s=wall, **timeline(trace, args.window))
        print(json.dumps(case, indent=1), flush=True)
        print(host_profile(model, ids, args.new_tokens), flush=True)
        results["cases"].append(case)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

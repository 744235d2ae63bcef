"""The CUDA-graph decode buckets, measured: decode step time at each bucket size and between them.

    python3 -m benchmarks.bench_buckets --out buckets.json [--context 512]

Decode steps of B one-token requests replay the graph of the smallest bucket >= B (`decode_buckets`: 2, 4, ...,
64, then every 64 up to max_batch_size), padded with one-token dummy requests. A Llama-3-8B-shaped model (random
bf16 weights, default config) times, per B, steps issued back to back (`cost.measure.StepHarness`, CUDA events):
the step ms in the smallest bucket that holds it, ms per request, one step's kernel time by class
(torch.profiler), and the step ms in the bucket the runner routes it to (the default). B off a
bucket (33, 65, 129, ...) costs what its bucket costs; the step-time rise from one bucket to the next bounds what
padding loses (a finer spacing could win back at most that).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import transformers

import nanoflow_fx
from benchmarks.common import build_model
from nanoflow_fx.cost.measure import StepHarness
from nanoflow_fx.cost.model import StepShape
from nanoflow_fx.explain import profile_harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--out", default="buckets.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nanoflow_fx.optimize(build_model("llama3-8b", "cuda", torch.bfloat16))
    model.nanoflow.wait_until_ready()  # time the chosen attention backend, not the interim kernel
    runtime = model.nanoflow
    graphs = runtime.runner.cuda_graphs
    assert graphs is not None, "CUDA graphs are off"
    buckets = graphs.buckets
    print("replay ms at capture:", {b: round(ms, 3) for b, ms in graphs.replay_ms.items()}, "route:", graphs.route)
    sizes = sorted({1, 3, 33, 65, 96, 129, 257, 449, *buckets} - {0})
    rows = []
    for b in sizes:
        shape = StepShape(b, args.context, 0)
        if not StepHarness.fits(runtime, shape):
            continue
        harness = StepHarness(runtime, shape, model.config.vocab_size)
        route = dict(graphs.route)
        try:
            graphs.route = {}  # the smallest bucket that holds the step
            ms = harness.time(runtime.runner.split_policy, reps=10)
            kernels = {k: round(v, 3) for k, v in profile_harness(harness).by_kind_ms().items()}
            graphs.route = route  # the default: routed by the replay times measured at capture
            routed_ms = harness.time(runtime.runner.split_policy, reps=10)
        finally:
            graphs.route = route
            harness.release()
        bucket = next((x for x in buckets if x >= b), None)
        rows.append(dict(batch=b, bucket=bucket, step_ms=ms, ms_per_request=ms / b, host_ms=harness.host_ms,
                         kernels_ms=kernels, routed_bucket=route.get(bucket, bucket), routed_step_ms=routed_ms))
        print(f"[measured] batch {b:4d} bucket {bucket} step {ms:7.3f} ms  {ms / b:6.3f} ms/request  kernels {kernels}"
              f"  routed to {route.get(bucket, bucket)}: {routed_ms:7.3f} ms", flush=True)
    steps = [r for r in rows if r["batch"] == r["bucket"]]
    for lo, hi in zip(steps, steps[1:]):
        print(f"bucket {lo['batch']:4d} -> {hi['batch']:4d}: step +{(hi['step_ms'] / lo['step_ms'] - 1) * 100:5.1f}%")
    meta = dict(date=str(datetime.date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, context=args.context, buckets=buckets,
                capture_replay_ms=graphs.replay_ms, route=graphs.route,
                config=runtime.config.to_dict())
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()

"""Why the cost table's host issue time of a dense step exceeds the host time the overlap bench measures.

    python3 -m benchmarks.research.probe_host_issue [--out host_issue.json]

Llama-3-8B shape (random bf16), the step lowered to a program (`num_nanobatches=2`), the mixed shape the search
tunes at a 1024-token budget (256 decodes at 1024 + 768 prefill tokens), unsplit. The host's time to issue one
step (`cost.measure.issue_ms`: planners' waits excluded), measured four ways:
  back-to-back   steps issued back to back (`StepHarness.time`'s host_ms);
  idle GPU       after a synchronize, the GPU idle;
  sleep          behind a sleep kernel (~50 ms), as `cost.measure.measure_shape` does, without its piece events;
  sleep+timer    as `measure_shape` does (sleep kernel and piece events);
and `measure_shape`'s own figure. Then one step issued behind the sleep kernel under
`torch.cuda.set_sync_debug_mode("warn")`: every synchronizing call it makes is listed, and the number of kernel
launches one step makes (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import nanoflow_fx
from benchmarks.common import build_model
from nanoflow_fx.cost.measure import StepHarness, issue_ms, measure_shape
from nanoflow_fx.cost.model import StepShape
from nanoflow_fx.runtime.program_runner import PieceTimer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="host_issue.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_num_tokens=1024, num_nanobatches=2, num_pages=24000,
                                                          cuda_graphs=False, max_batch_size=320, max_seq_len=4096))
    runtime = model.nanoflow
    runner, channel = runtime.runner, runtime.channel
    shape = StepShape(256, 1024, 768)
    harness = StepHarness(runtime, shape, model.config.vocab_size)
    runner.split_policy = None
    step = lambda: runner.run_eager(harness.chunks)  # noqa: E731 (reads `harness` when called)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": str(shape)}
    try:
        gpu_ms = harness.time(None, reps=6)
        out["step_ms"], out["back_to_back_host_ms"] = round(gpu_ms, 2), round(harness.host_ms, 2)

        waits: dict[str, float] = {}

        def sample(sleep: bool, timer: bool) -> float:
            values, waited = [], runner.planner_wait_s
            for _ in range(5):
                torch.cuda.synchronize()
                if sleep:
                    torch.cuda._sleep(100_000_000)
                channel.timer = PieceTimer(True) if timer else None
                try:
                    values.append(issue_ms(runner, step))
                finally:
                    channel.timer = None
                torch.cuda.synchronize()
            waits[f"sleep={sleep} timer={timer}"] = round((runner.planner_wait_s - waited) / 5 * 1e3, 2)
            return round(statistics.median(values), 2)

        out["idle_gpu_host_ms"] = sample(False, False)
        out["sleep_host_ms"] = sample(True, False)
        out["sleep_timer_host_ms"] = sample(True, True)
        out["planner_wait_ms_per_step"] = waits
        print(json.dumps(out), flush=True)
        harness.release()  # (measure_shape holds the shape's requests itself: the cache fits one set)
        out["measure_shape_host_ms"] = round(measure_shape(runtime, model.config.vocab_size, shape)[1], 2)
        print(json.dumps(out), flush=True)
        harness = StepHarness(runtime, shape, model.config.vocab_size)
        runner.split_policy = None
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        out["syncs"] = sorted({f"{Path(w.filename).name}:{w.lineno} {str(w.message).splitlines()[0][:80]}"
                               for w in caught})
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        launches = {e.key: e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunch", "cuLaunch"))}
        out["launches"] = launches
    finally:
        harness.release()
    print(json.dumps(out, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

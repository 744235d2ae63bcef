"""Where a steady engine step's GPU time goes, per kernel: torch.profiler over engine steps (CUDA-graph replays
included), Llama-3-8B shape, one config per process; to compare KV-cache dtypes or attention backends.

    python3 -m benchmarks.research.probe_step_kernels --config '{"kv_cache_dtype": "fp8_e4m3"}' --out k.json

`--requests` of 1024 prompt tokens and 512 new are added at once; two phases are profiled, `--steps` each: "mixed"
(after `--mixed-at` steps: prefill chunks beside decodes, as in the offline 1024/512 run's first part) and "decode"
(after every prompt is in: decode steps only). Per phase: ms per step of kernels by class (GEMM, attention, KV write,
other; a kernel's class from its name) and the 15 kernels with the most time. JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import engine_with_requests

CLASSES = (("attention", re.compile(r"attention|flashinfer|paged|decode|prefill|fmha|flash", re.I)),
           ("kv write", re.compile(r"kv_write|write_kv|append|quantize_kv", re.I)),
           ("GEMM", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|matmul|_mm_|scaled_mm|cublas", re.I)))


def kind(name: str) -> str:
    return next((label for label, pattern in CLASSES if pattern.search(name)), "other")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase(engine: Any, steps: int) -> dict[str, Any]:
    _sync()
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        _sync()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:  # (a CPU run: none)
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time_total / 1e3 / steps
    classes: dict[str, float] = {}
    for name, ms in kernels.items():
        classes[kind(name)] = classes.get(kind(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return dict(ms_per_step={k: round(v, 3) for k, v in sorted(classes.items())},
                total_ms=round(sum(classes.values()), 3), running=len(engine.running),
                top=[(name[:140], round(ms, 3), kind(name)) for name, ms in top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--mixed-at", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shape", default="llama3-8b", help="benchmarks.common.SHAPES (tiny: a smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run, no kernels)")
    parser.add_argument("--out", default="probe_step_kernels.json")
    args = parser.parse_args()
    model = engine_with_requests(args.shape, args.device, args.config, args.requests)
    engine = model.nanoflow.engine
    result: dict[str, Any] = dict(config=json.loads(args.config), attention=model.nanoflow.attention_backend.name)
    for _ in range(args.mixed_at):
        engine.step()
    result["mixed"] = phase(engine, args.steps)
    while engine.waiting or any(r.num_cached < len(r.prompt) for r in engine.running):
        engine.step()
    result["decode"] = phase(engine, args.steps)
    print(json.dumps(result, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

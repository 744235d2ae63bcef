"""Where the engine's host time goes in a mixed steady state (Llama-3-8B shape, bf16): cProfile over engine
steps with a table of 1024/512 requests in flight (decodes plus prefill chunks every step).

    python3 -m benchmarks.profile_engine [--config '{"max_num_tokens": 1024}'] [--warmup 60] [--steps 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from benchmarks.common import engine_with_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="profile_engine.txt")
    args = parser.parse_args()
    model = engine_with_requests("llama3-8b", "cuda", args.config, args.requests)
    engine = model.nanoflow.engine
    for _ in range(args.warmup):
        engine.step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    wall = (time.perf_counter() - start) / args.steps * 1e3
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(60)
    summary = (f"{args.steps} steps, {wall:.1f} ms per step under cProfile; running {len(engine.running)}, "
               f"waiting {len(engine.waiting)}, step tokens ~{model.nanoflow.config.max_num_tokens}")
    Path(args.out).write_text(summary + "\n" + text.getvalue())
    print(summary)
    print(text.getvalue()[:12000])


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: CUDA kernels (torch.profiler) and host phases, Llama-3-8B shape, bf16.

    python benchmarks/profile_decode.py --batch-size 64 --context 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nanoflow_fx  # noqa: E402
from examples.generate import build_model  # noqa: E402
from nanoflow_fx.runtime import Chunk  # noqa: E402
from nanoflow_fx.runtime.batch import build_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=args.batch_size, max_seq_len=args.context + args.steps + 1,
                                        check_capture=False)  # profiling only; correctness is the tests' job
    nanoflow_fx.optimize(model, config)
    engine = model.nanoflow.engine
    prompts = [[5] * args.context for _ in range(args.batch_size)]
    requests = engine.admit(prompts, max_new_tokens=args.steps + 1)
    for chunk_start in range(0, args.batch_size, max(1, 4096 // args.context)):  # prefill
        group = requests[chunk_start : chunk_start + max(1, 4096 // args.context)]
        engine.run([Chunk(r, args.context) for r in group])
        for r in group:
            r.output.append(7)
    chunks = lambda: [Chunk(r, 1) for r in requests]  # noqa: E731
    engine.run(chunks())
    for r in requests:
        r.output.append(7)
    torch.cuda.synchronize()
    cache = engine.kv_cache
    start = time.perf_counter()
    for _ in range(20):
        build_step(chunks(), cache.caches, cache.page_size, cache.scratch_page, torch.device("cpu"),
                   backend="triton", shape=engine.cuda_graphs.shape_for(args.batch_size, args.batch_size))
    print(f"host build_step: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            logits = engine.run(chunks())
            token = logits.argmax(-1).tolist()
            for r, t in zip(requests, token):
                r.output.append(t)
        torch.cuda.synchronize()
    print(f"decode step wall: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms (batch {args.batch_size}, "
          f"context {args.context}, CUDA graphs {engine.cuda_graphs is not None})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()

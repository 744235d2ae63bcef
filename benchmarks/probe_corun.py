"""Do the balanced step's two kernel kinds slow each other down when they co-run on disjoint SMs?

    python benchmarks/probe_corun.py [--out corun.json]

One layer's worth of the Llama-3-8B balanced step's work, repeated: its gate/up GEMM (1056 x 4096 @ 4096 x 28672,
bf16, cuBLASLt) and decode attention over 288 requests at context 1280 (nanoflow's Triton kernel, half-precision
P@V, one layer's paged KV). For each SM share k: the attention alone on a green-context partition of k SMs, the
GEMMs alone on the remaining SMs' partition with the cuBLASLt carve-out of k SMs, then both at once ("hard"), and
the same with the GEMMs on the default stream without carve-out ("soft"). A streaming copy stands in for a
memory kernel with no reuse. Each co-run reports each stream's time from a common start; the kernel that
finishes first ran co-running throughout, so its rate is its co-run rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_attention_sms import make_batch, triton_fn  # noqa: E402
from nanoflow_fx.runtime.green_context import split_sms  # noqa: E402
from nanoflow_fx.runtime.program_runner import sm_carveout  # noqa: E402


def loop(fn: Any, n: int) -> Any:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def timed(jobs: list[tuple[Any, Any, int]]) -> list[float]:
    """Run each (fn, stream, carveout) at once from a common start; ms from the start to each one's end."""
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record(torch.cuda.current_stream())
    ends = []
    for fn, stream, carve in jobs:
        stream.wait_event(start)
        with torch.cuda.stream(stream), sm_carveout(carve):
            fn()
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        ends.append(end)
    torch.cuda.synchronize()
    return [start.elapsed_time(e) for e in ends]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corun.json")
    parser.add_argument("--shares", type=int, nargs="*", default=[32, 48])
    args = parser.parse_args()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    a = torch.randn(1056, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 28672, device="cuda", dtype=torch.bfloat16)
    gemm_flop = 2 * 1056 * 4096 * 28672
    batch = make_batch(288, 1280)
    attend = triton_fn(batch, block_n=128, num_stages=3, num_warps=4, pv_precision="half")
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)  # 1 GiB streamed by a copy
    dst = torch.empty_like(src)
    memory_kernels = {"attention": (attend, batch["bytes"]), "copy": (lambda: dst.copy_(src), 2 * src.numel())}
    default = torch.cuda.current_stream()
    results: list[dict[str, Any]] = []
    for fn in (lambda: a @ w, attend, lambda: dst.copy_(src)):
        fn()
    torch.cuda.synchronize()
    for k in args.shares:
        memory, rest = split_sms(k)
        gemms = loop(lambda: a @ w, 60)
        for stream, carve in ((memory.stream, 0), (rest.stream, memory.num_sms)):  # per-stream first-use costs
            timed([(loop(lambda: a @ w, 2), stream, carve), (attend, stream, 0), (lambda: dst.copy_(src), stream, 0)])
        (g_alone,) = timed([(gemms, rest.stream, memory.num_sms)])
        (g_whole,) = timed([(gemms, default, 0)])
        for name, (fn, nbytes) in memory_kernels.items():
            reps = 40 if name == "attention" else 20
            mem = loop(fn, reps)
            (m_alone,) = timed([(mem, memory.stream, 0)])
            (m_whole,) = timed([(mem, default, 0)])
            for mode, gemm_stream, carve in (("hard", rest.stream, memory.num_sms), ("soft", default, 0)):
                m_co, g_co = timed([(mem, memory.stream, 0), (gemms, gemm_stream, carve)])
                row = {"sms": memory.num_sms, "memory_kernel": name, "mode": mode,
                       "memory_alone_tb_s": round(nbytes * reps / m_alone / 1e9, 3),
                       "memory_whole_gpu_tb_s": round(nbytes * reps / m_whole / 1e9, 3),
                       "gemm_alone_tflops": round(gemm_flop * 60 / g_alone / 1e9, 1),
                       "gemm_whole_gpu_tflops": round(gemm_flop * 60 / g_whole / 1e9, 1),
                       "memory_ms": round(m_alone, 2), "gemm_ms": round(g_alone, 2),
                       "together_ms": round(max(m_co, g_co), 2), "memory_co_ms": round(m_co, 2),
                       "gemm_co_ms": round(g_co, 2), "serial_whole_gpu_ms": round(m_whole + g_whole, 2)}
                # the one that ends first co-ran all along: its rate is the co-run rate
                if m_co <= g_co:
                    row["memory_corun_tb_s"] = round(nbytes * reps / m_co / 1e9, 3)
                else:
                    row["gemm_corun_tflops"] = round(gemm_flop * 60 / g_co / 1e9, 1)
                row["speedup_over_serial"] = round(row["serial_whole_gpu_ms"] / row["together_ms"], 3)
                results.append(row)
                print(json.dumps(row), flush=True)
    out = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rows": results}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

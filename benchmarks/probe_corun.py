"""Do the balanced step's two kernel kinds slow each other down when they co-run, and does a GEMM sized to its
partition help?

    python benchmarks/probe_corun.py [--out corun.json]

One layer's worth of the Llama-3-8B balanced step's work, repeated: its gate/up GEMM (x [1056, 4096] times
weight [28672, 4096]^T, bf16) and decode attention over 288 requests at context 1280 (nanoflow's Triton kernel,
half-precision P@V, one layer's paged KV; also with its K/V loads marked evict_first, so that they leave L2
before the GEMM's tiles); a streaming 1 GiB copy stands in for a memory kernel with no reuse.
The GEMM runs as cuBLAS (cuBLASLt) or as nanoflow's persistent Triton GEMM (`ops.triton_gemm`, its grid sized
to the SMs it is given). For each SM share k, each GEMM variant and memory kernel: each alone, then both at once:
  soft         the memory kernel on a green-context partition of k SMs, cuBLAS on the default stream;
  hard         cuBLAS on the other SMs' green context with the carve-out of k SMs;
  hard-triton  the persistent Triton GEMM on the other SMs' green context, grid = their SM count.
Each co-run reports each stream's time from a common start; the kernel that finishes first co-ran all along,
so its rate is its co-run rate (the other's is given only as the time to its end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_attention_sms import make_batch, triton_fn  # noqa: E402
from nanoflow_fx.ops.triton_gemm import persistent_linear  # noqa: E402
from nanoflow_fx.runtime.green_context import split_sms  # noqa: E402
from nanoflow_fx.runtime.program_runner import sm_carveout  # noqa: E402

GEMMS, ATTENTION, COPIES = 60, 40, 20  # calls per run: each alone takes tens of ms


def loop(fn: Any, n: int) -> Any:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def timed(jobs: list[tuple[Any, Any, int]]) -> list[float]:
    """Run each (fn, stream, carve-out SMs) at once from a common start; ms from the start to each one's end."""
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
    x = torch.randn(1056, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16) / 64
    flop = 2 * x.shape[0] * x.shape[1] * weight.shape[0]
    torch.testing.assert_close(persistent_linear(x, weight), F.linear(x, weight), rtol=2e-2, atol=2e-2)
    batch = make_batch(288, 1280)
    launch = dict(block_n=128, num_stages=3, num_warps=4, pv_precision="half")
    attend = triton_fn(batch, **launch)
    attend_evicting = triton_fn(batch, **launch, kv_eviction="evict_first")  # K/V leave L2 first
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    memory_kernels = {"attention": (loop(attend, ATTENTION), ATTENTION * batch["bytes"]),
                      "attention evict_first": (loop(attend_evicting, ATTENTION), ATTENTION * batch["bytes"]),
                      "copy": (loop(lambda: dst.copy_(src), COPIES), COPIES * 2 * src.numel())}
    default = torch.cuda.current_stream()
    total = torch.cuda.get_device_properties(0).multi_processor_count
    cublas = loop(lambda: F.linear(x, weight), GEMMS)
    whole_triton = loop(lambda: persistent_linear(x, weight, total), GEMMS)
    for fn in (cublas, whole_triton, *(f for f, _ in memory_kernels.values())):
        timed([(fn, default, 0)])  # warm-up, compile
    out: dict[str, Any] = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "gemm_whole_gpu_tflops": {}, "rows": []}
    for name, fn in (("cublas", cublas), ("triton", whole_triton)):
        (ms,) = timed([(fn, default, 0)])
        out["gemm_whole_gpu_tflops"][name] = round(flop * GEMMS / ms / 1e9, 1)
    print("GEMM on the whole GPU, TFLOP/s:", out["gemm_whole_gpu_tflops"], flush=True)
    whole = {name: timed([(fn, default, 0)])[0] for name, (fn, _) in memory_kernels.items()}
    (cublas_whole,) = timed([(cublas, default, 0)])
    for k in args.shares:
        memory, rest = split_sms(k)
        part_triton = loop(lambda r=rest.num_sms: persistent_linear(x, weight, r), GEMMS)
        gemm_modes = {"soft": (cublas, default, 0), "hard": (cublas, rest.stream, memory.num_sms),
                      "hard-triton": (part_triton, rest.stream, 0)}
        for job in gemm_modes.values():
            timed([job])  # per-stream first use (cuBLAS workspaces, allocator pools)
        gemm_alone = {mode: timed([job])[0] for mode, job in gemm_modes.items()}
        for name, (mem, nbytes) in memory_kernels.items():
            timed([(mem, memory.stream, 0)])
            (mem_alone,) = timed([(mem, memory.stream, 0)])
            for mode, job in gemm_modes.items():
                mem_co, gemm_co = timed([(mem, memory.stream, 0), job])
                serial = whole[name] + cublas_whole  # one after the other, each on the whole GPU
                row = {"memory_sms": memory.num_sms, "gemm_sms": total if mode == "soft" else rest.num_sms,
                       "memory_kernel": name, "mode": mode,
                       "memory_whole_gpu_tb_s": round(nbytes / whole[name] / 1e9, 3),
                       "memory_alone_tb_s": round(nbytes / mem_alone / 1e9, 3),
                       "gemm_alone_tflops": round(flop * GEMMS / gemm_alone[mode] / 1e9, 1),
                       "memory_co_ms": round(mem_co, 2), "gemm_co_ms": round(gemm_co, 2),
                       "together_ms": round(max(mem_co, gemm_co), 2), "serial_whole_gpu_ms": round(serial, 2)}
                if mem_co <= gemm_co:  # the one that ends first co-ran all along
                    row["memory_corun_tb_s"] = round(nbytes / mem_co / 1e9, 3)
                else:
                    row["gemm_corun_tflops"] = round(flop * GEMMS / gemm_co / 1e9, 1)
                row["speedup_over_serial"] = round(serial / row["together_ms"], 3)
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

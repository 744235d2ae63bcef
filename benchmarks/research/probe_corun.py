"""Do the balanced step's two kernel kinds slow each other down when they co-run, and does a GEMM sized to its
partition help?

    python3 -m benchmarks.research.probe_corun [--out corun.json]

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

Then (--sustained S, default 2 s; `power_cases`) the pair shaped like the balanced step, layer by layer, each
case kept busy for about S seconds while nvidia-smi samples the SM clock, the board power and the active
clock-event (throttle) reasons every 20 ms: serial on one stream against co-runs per mode and share, with each
unit's exact progress while both ran. Do the two units slow each other down through the shared power budget
(clocks drop) or through the memory system (clocks hold)? (--no-burst / --sustained 0: one part only.)
With --fp8 the sustained GEMMs run in FP8 (e4m3 operands, per-tensor scales, `torch._scaled_mm`, bf16 out; same
shapes and layer composition, no Triton variant): does a GEMM that costs less energy per FLOP leave the power the
overlap needs?
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.research.bench_attention_sms import make_batch, triton_fn
from nanoflow_fx.ops.triton_gemm import persistent_linear
from nanoflow_fx.runtime.green_context import split_sms
from nanoflow_fx.runtime.program_runner import sm_carveout

GEMMS, ATTENTION, COPIES = 60, 40, 20  # calls per run: each alone takes tens of ms


def loop(fn: Any, n: int) -> Any:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def timed(jobs: list[tuple[Any, Any, int]]) -> list[float]:
    """Run each (fn, stream, carve-out SMs) once, all at once from a common start (`chunks_at_once`); ms from the
    start to each one's end."""
    return [ends[-1] for ends in chunks_at_once([(fn, 1, stream, carve) for fn, stream, carve in jobs])]


class Sampler:
    """nvidia-smi's SM clock (MHz), board power (W) and clock-event reasons, every 20 ms while open."""

    FIELDS = ("clocks.sm", "power.draw", "clocks_event_reasons.active")

    def __init__(self) -> None:
        fields = list(self.FIELDS)
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={fields[-1]}", "--format=csv"], capture_output=True)
        if probe.returncode != 0:  # older drivers name it clocks_throttle_reasons
            fields[-1] = "clocks_throttle_reasons.active"
        self.fields = fields
        self.samples: list[tuple[float, list[str]]] = []

    def __enter__(self) -> Sampler:
        index = torch.cuda.current_device()
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), f"--query-gpu={','.join(self.fields)}", "--format=csv,noheader,nounits",
             "-lms", "20"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.samples = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        time.sleep(0.5)  # nvidia-smi's start-up
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.samples.append((time.perf_counter(), [v.strip() for v in line.split(",")]))

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(timeout=2)

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        rows = [v for t, v in self.samples if t0 <= t <= t1]
        clocks = [float(v[0]) for v in rows if _number(v[0])]
        power = [float(v[1]) for v in rows if len(v) > 1 and _number(v[1])]
        reasons = sorted({v[2] for v in rows if len(v) > 2})
        return {"samples": len(rows), "sm_mhz": round(sum(clocks) / len(clocks)) if clocks else None,
                "sm_mhz_min": min(clocks, default=None),
                "power_w": round(sum(power) / len(power), 1) if power else None, "reasons": reasons}


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def sustained(sampler: Sampler, jobs: list[tuple[Any, Any, int, float]], seconds: float) -> tuple[list[float], dict]:
    """Each (fn, stream, carve-out SMs, ms of one fn alone) repeated to last about `seconds` alone, all at once
    from a common start; ms from the start to each one's end, and the samples of the window where all ran."""
    repeated = [(loop(fn, max(1, math.ceil(seconds * 1e3 / ms))), stream, carve) for fn, stream, carve, ms in jobs]
    with sampler:
        ends = timed(repeated)
        done = time.perf_counter()
    start = done - max(ends) / 1e3
    window = sampler.between(start + 0.1 * min(ends) / 1e3, start + 0.9 * min(ends) / 1e3)
    return ends, window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corun.json")
    parser.add_argument("--shares", type=int, nargs="*", default=[32, 48])
    parser.add_argument("--sustained", type=float, default=2.0, help="seconds per sampled case (0: none)")
    parser.add_argument("--no-burst", action="store_true", help="only the sustained cases")
    parser.add_argument("--fp8", action="store_true", help="the sustained cases' GEMMs in FP8 (see above)")
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
    for k in [] if args.no_burst else args.shares:
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
    if args.sustained > 0:
        out["sustained"] = power_cases(args, attend, x, weight)
    Path(args.out).write_text(json.dumps(out, indent=1))


STEP_RATIO = 17.85 / 20.56  # the balanced step's attention : GEMM kernel time on the H100 (RESULTS.md)


def chunks_at_once(jobs: list[tuple[Any, int, Any, int]]) -> list[list[float]]:
    """Each (chunk fn, count, stream, carve-out SMs) at once from a common start, issued interleaved (every stream
    kept fed); per job, ms from the start to the end of each of its chunks."""
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)  # ~10 ms: the first chunks of every job are queued before the start fires
    start.record(torch.cuda.current_stream())
    for _, _, stream, _ in jobs:
        stream.wait_event(start)
    ends: list[list[Any]] = [[] for _ in jobs]
    for i in range(max(count for _, count, _, _ in jobs)):
        for j, (fn, count, stream, carve) in enumerate(jobs):
            if i < count:
                with torch.cuda.stream(stream), sm_carveout(carve):
                    fn()
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                ends[j].append(end)
    torch.cuda.synchronize()
    return [[start.elapsed_time(e) for e in job] for job in ends]


def done_by(ends: list[float], t: float) -> float:
    """Chunks finished by `t` ms (the running one counted by the fraction of its span that passed)."""
    previous = 0.0
    for n, end in enumerate(ends):
        if end > t:
            return n + max(0.0, t - previous) / (end - previous)
        previous = end
    return float(len(ends))


def power_cases(args: Any, attention_once: Any, x: torch.Tensor, weight: torch.Tensor) -> list[dict]:
    """The balanced step's pair, shaped like it: L "layers", each a GEMM chunk (two gate/up GEMMs) and an attention
    chunk sized to the step's attention : GEMM time (`STEP_RATIO`), L such that the pair takes about
    `--sustained` seconds one after the other. Cases, each kept busy and sampled (clock, power, reasons):
      - serial: the chunks alternating on one stream (what the unsplit step does, layer by layer);
      - each unit alone on the whole GPU, and alone on its partition (attention on k SMs, the GEMMs as soft /
        hard / hard-triton on the rest);
      - co-run: attention chunks on a green context of k SMs, GEMM chunks on the other unit, both at once.
    Rates are fractions of the unit's sustained whole-GPU rate (cuBLAS's for both GEMM variants); a co-run's
    rates are each unit's progress (chunks done) up to the first unit's end, so both are exact."""
    sampler = Sampler()
    default = torch.cuda.current_stream()
    with sampler:
        time.sleep(0.5)
    idle = sampler.between(0.0, math.inf)
    print("idle:", idle, flush=True)
    rows: list[dict] = [{"case": "idle", **idle}]
    gemm_once = lambda: F.linear(x, weight)  # noqa: E731
    if args.fp8:
        x8, w8 = x.to(torch.float8_e4m3fn), weight.to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device)
        got = torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch.testing.assert_close(got, F.linear(x8.to(x.dtype), w8.to(x.dtype)), rtol=2e-2, atol=2e-1)
        gemm_once = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,  # noqa: E731
                                             out_dtype=torch.bfloat16)
    (bf16_ms,) = timed([(loop(lambda: F.linear(x, weight), 20), default, 0)])
    (gemm_ms,) = timed([(loop(gemm_once, 20), default, 0)])
    (attn_ms,) = timed([(loop(attention_once, 20), default, 0)])
    a_calls = max(1, round(STEP_RATIO * 2 * bf16_ms / attn_ms))  # the bf16 step's composition, also with --fp8
    layers = math.ceil(args.sustained * 1e3 / ((2 * gemm_ms + a_calls * attn_ms) / 20))
    print(f"chunks: 2 GEMMs ({2 * gemm_ms / 20:.3f} ms) + {a_calls} attention calls ({a_calls * attn_ms / 20:.3f} ms)"
          f" per layer, {layers} layers", flush=True)
    attention_chunk = loop(attention_once, a_calls)

    def gemm_chunk(sms: int | None) -> Any:
        if sms is None:
            return loop(gemm_once, 2)
        return loop(lambda: persistent_linear(x, weight, sms), 2)

    def run(case: str, jobs: list[tuple[str, Any, Any, int]], whole: dict[str, float] | None = None) -> dict:
        for _, fn, stream, carve in jobs:  # first use here (Triton compiles per grid size, streams' workspaces)
            with torch.cuda.stream(stream), sm_carveout(carve):
                fn()
        with sampler:
            ends = chunks_at_once([(fn, layers, stream, carve) for _, fn, stream, carve in jobs])
            finished = time.perf_counter()
        last = [e[-1] for e in ends]
        first = min(last)
        zero = finished - max(last) / 1e3
        row: dict[str, Any] = {"case": case, "ms": round(max(last), 1),
                               **sampler.between(zero + 0.1 * first / 1e3, zero + 0.9 * first / 1e3)}
        for (name, *_), e in zip(jobs, ends):
            row[f"{name}_ms"] = round(e[-1], 1)
            if whole and name in whole:  # fraction of the unit's whole-GPU rate while all ran
                row[f"{name}_rate"] = round(done_by(e, first) * whole[name] / layers / first, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    cublas_chunk = gemm_chunk(None)
    serial_row = run("serial, one stream", [("pair", lambda: (cublas_chunk(), attention_chunk()), default, 0)])
    serial = serial_row["ms"]
    whole = {"gemm": run("GEMMs alone, whole GPU", [("gemm", gemm_chunk(None), default, 0)])["ms"],
             "attention": run("attention alone, whole GPU", [("attention", attention_chunk, default, 0)])["ms"]}
    if not args.fp8:
        total = torch.cuda.get_device_properties(0).multi_processor_count
        run("Triton GEMMs alone, whole GPU", [("gemm", gemm_chunk(total), default, 0)], whole)
    for k in args.shares:
        memory, rest = split_sms(k)
        run(f"attention alone on {memory.num_sms} SMs", [("attention", attention_chunk, memory.stream, 0)], whole)
        modes = {"soft": (gemm_chunk(None), default, 0), "hard": (gemm_chunk(None), rest.stream, memory.num_sms),
                 "hard-triton": (gemm_chunk(rest.num_sms), rest.stream, 0)}
        if args.fp8:
            del modes["hard-triton"]
        for mode, (fn, stream, carve) in modes.items():
            if mode != "soft":
                run(f"GEMMs alone, {mode} on {rest.num_sms} SMs", [("gemm", fn, stream, carve)], whole)
            row = run(f"co-run {mode}, attention on {memory.num_sms} SMs",
                      [("attention", attention_chunk, memory.stream, 0), ("gemm", fn, stream, carve)], whole)
            row["speedup_over_serial"] = round(serial / row["ms"], 3)
            print(f"  {mode} {memory.num_sms}: {row['ms']} ms against serial {serial} ms: "
                  f"{row['speedup_over_serial']}x", flush=True)
    return rows


if __name__ == "__main__":
    main()

"""Device ceilings, measured once per device and process: dense matmul rate and copy bandwidth.

`token_budget` turns them into the engine's default step size: a step reads every weight once and does
2 x parameters FLOPs per token, so with T tokens its GEMMs take 2PT / F and its weight reads about
bytes(P) / B; from there on, the GEMMs take at least four times as long as
the reads, and the step is compute-bound (NanoFlow's dense batch: 1024 tokens for 8B models on an A100). With
b bytes per parameter that is T >= 2 F b / B: about 1,100 tokens for bf16 on an H100 (825 TFLOP/s, 3 TB/s).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["DeviceCeilings", "measure_ceilings", "token_budget"]


@dataclass(frozen=True)
class DeviceCeilings:
    """What one device reaches: `matmul_flops` (FLOP/s of a large half-precision matmul on random data) and
    `copy_bandwidth` (bytes read + written per second by a large device-to-device copy)."""

    name: str
    matmul_flops: float
    copy_bandwidth: float


@functools.cache
def measure_ceilings(device: torch.device) -> DeviceCeilings:
    """Measure the ceilings of a CUDA device (about 0.2 s; once per process and device)."""
    if device.type != "cuda":
        raise ValueError(f"device ceilings are measured on CUDA devices, not {device}")
    with torch.cuda.device(device):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        flops = 2 * n**3 / _seconds(functools.partial(torch.mm, a, b))
        del a, b
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() / _seconds(functools.partial(dst.copy_, src))
        del src, dst
        torch.cuda.empty_cache()
    return DeviceCeilings(torch.cuda.get_device_name(device), flops, bandwidth)


def _seconds(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: handles, kernels, allocator
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def token_budget(ceilings: DeviceCeilings, bytes_per_param: int, low: int = 256, high: int = 8192) -> int:
    """The smallest power of two in [low, high] whose step's GEMM time is >= 4x its weight-read time."""
    need = 4 * ceilings.matmul_flops * bytes_per_param / (2 * ceilings.copy_bandwidth)
    budget = low
    while budget < need and budget < high:
        budget *= 2
    return budget

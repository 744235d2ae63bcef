"""Device ceilings, measured once per device and process: dense matmul rate and copy bandwidth.

`token_budget` turns them into the engine's default step size: a step reads every weight once and does
2 x parameters FLOPs per token, so with T tokens its GEMMs take 2PT / F and its weight reads about
bytes(P) / B; from there on, the GEMMs take at least five times as long as the reads, and the step is
compute-bound (NanoFlow's dense batch). With b bytes per parameter that is T >= 2.5 F b / B, rounded up to a
power of two. The factor five keeps a device's budget clear of the boundary where run-to-run spread of the
measured ceilings would move it by a power of two; the engine measurements behind it are in benchmarks/RESULTS.md
("Defaults re-measured").
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["DeviceCeilings", "measure_ceilings", "token_budget"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceCeilings:
    """What one device reaches: `matmul_flops` (FLOP/s of a large half-precision matmul on random data) and
    `copy_bandwidth` (bytes read + written per second by a large device-to-device copy)."""

    name: str
    matmul_flops: float
    copy_bandwidth: float


def measure_ceilings(device: torch.device, directory: str | os.PathLike[str] | None = None) -> DeviceCeilings:
    """The ceilings of a CUDA device: measured once per process (about 0.5 s), and with `directory`, once per
    device type, torch and CUDA version there (`device_ceilings.json`), so that every process on a machine derives
    the same defaults from them (two measurements on one device may differ by enough to move the step budget by a
    power of two: see `token_budget`)."""
    if device.type != "cuda":
        raise ValueError(f"device ceilings are measured on CUDA devices, not {device}")
    if directory is None:
        return _measure(device)
    path = Path(directory) / "device_ceilings.json"
    key = (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
           f"method {_METHOD}")  # (a new method measures again: figures saved by the old one may be the slow ones)
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
        if key in saved:
            return DeviceCeilings(**saved[key])
    except (OSError, ValueError, TypeError) as e:
        log.warning("nanoflow_fx: ignoring unreadable %s (%s)", path, e)
        saved = {}
    ceilings = _measure(device)
    saved[key] = asdict(ceilings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("nanoflow_fx: could not save the device ceilings to %s (%s)", path, e)
    return ceilings


_METHOD = 2  # 2: the fastest call after a 0.2 s warm-up (`_seconds`)


@functools.cache
def _measure(device: torch.device) -> DeviceCeilings:
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


def _seconds(fn: Callable[[], object], repeats: int = 7, warm_s: float = 0.2) -> float:
    """The fastest of `repeats` timed calls, after calling `fn` for `warm_s` seconds. A ceiling is what the
    device reaches, and anything else only slows a call down, so the fastest call is kept, not the median. The
    warm-up is long because an idle GPU raises its clocks only once it is busy: a short warm-up once measured a
    fraction of a fresh GPU's copy bandwidth and put the step budget at its cap (benchmarks/RESULTS.md)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    while True:  # warm-up: handles, kernels, allocator, clocks
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - began >= warm_s:
            break
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def token_budget(ceilings: DeviceCeilings, bytes_per_param: int, low: int = 256, high: int = 8192) -> int:
    """The smallest power of two in [low, high] whose step's GEMM time is >= 5x its weight-read time."""
    need = 5 * ceilings.matmul_flops * bytes_per_param / (2 * ceilings.copy_bandwidth)
    budget = low
    while budget < need and budget < high:
        budget *= 2
    return budget

"""A persistent GEMM in Triton whose grid is sized to an SM partition: `persistent_linear(x, weight, num_sms)`.

cuBLAS sizes its grids for the whole device, so on a green-context partition of fewer SMs its GEMMs run a
second, partial wave. Here `num_sms` programs each loop over the output tiles (`tile = pid, pid + num_sms, ...`,
grouped by `GROUP_M` rows of tiles so that neighbouring programs share their weight tiles in L2), so the kernel fills
exactly the partition it is given, and its time scales with the partition's SM count. It computes
`x @ weight.T` (torch.nn.functional.linear's layout, no bias), accumulating in fp32.

`partitioned_gemms(num_sms)` routes every matmul issued inside it (aten.mm and addmm, as Inductor's compiled pieces
and eager linears issue them) to this kernel with `num_sms` programs: what the compute unit of a "hard-triton"
partition runs (`runtime.program_runner.make_units`). It intercepts at the dispatcher (a TorchDispatchMode), so
the captured and compiled step is the same with and without it, and nothing changes outside it.

Runs under TRITON_INTERPRET=1 on the CPU (with small tiles: `launch`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PartitionedGemms", "launch_config", "partitioned_gemms", "persistent_linear"]

_aten = torch.ops.aten


@triton.jit
def _persistent_linear_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
        first_m = (tile // per_group) * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)  # the last group may have fewer rows of tiles
        pid_m = first_m + (tile % per_group) % rows
        pid_n = (tile % per_group) // rows
        offs_m = pid_m * BLOCK_M + rm
        offs_n = pid_n * BLOCK_N + rn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + rk
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def launch_config(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Tiles and launch parameters. On CUDA for half types: 128 x 256 x 64 tiles, 8 warps, 4 stages, a
    configuration chosen by probing a persistent Triton GEMM on an 8B model's layer GEMMs. With it the kernel is
    slower than cuBLAS on the whole GPU, and on a partition about as fast as cuBLAS carved out to the same SMs
    (benchmarks/RESULTS.md; measured by `python3 -m benchmarks.research.probe_corun`). Elsewhere (fp32, the
    interpreter) small tiles."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dict(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=4)
    return dict(block_m=32, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=2)


def persistent_linear(x: torch.Tensor, weight: torch.Tensor, num_sms: int | None = None,
                      out: torch.Tensor | None = None, **launch: Any) -> torch.Tensor:
    """`x @ weight.T` ([M, K] x [N, K] -> [M, N]) by at most `num_sms` programs, each looping over output tiles:
    the whole of an SM partition of `num_sms` SMs and no more (default: every SM of the device; 1 on the CPU),
    written to `out` when given. `launch` overrides `launch_config`'s choices (benchmarks)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"persistent_linear takes x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"persistent_linear needs x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    (m, k), n = x.shape, weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype:
        raise ValueError(f"persistent_linear's out must be [{m}, {n}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if m == 0 or n == 0:
        return out
    config = {**launch_config(x.dtype, x.device), **launch}
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    if num_sms < 1:
        raise ValueError(f"persistent_linear needs num_sms >= 1, got {num_sms}")
    tiles = triton.cdiv(m, config["block_m"]) * triton.cdiv(n, config["block_n"])
    _persistent_linear_kernel[(min(num_sms, tiles),)](
        x, weight, out, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_K=config["block_k"], GROUP_M=config["group_m"],
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


class PartitionedGemms(TorchDispatchMode):
    """While active, aten.mm (also with `out=`) and addmm (beta = alpha = 1) of two same-dtype matrices on a
    device Triton can run on go to `persistent_linear` with `num_sms` programs; every other op runs as it would.
    `calls` counts the matmuls it took."""

    def __init__(self, num_sms: int) -> None:
        super().__init__()
        self.num_sms, self.calls = num_sms, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (_aten.mm.default, _aten.mm.out) and self._takes(*args[:2]):
            out = kwargs.get("out")
            if out is None or (out.dtype == args[0].dtype and out.shape == (args[0].shape[0], args[1].shape[1])):
                self.calls += 1
                return persistent_linear(args[0], args[1].t(), self.num_sms, out=out)
        if (func is _aten.addmm.default and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
                and self._takes(*args[1:3])):
            self.calls += 1
            return persistent_linear(args[1], args[2].t(), self.num_sms).add_(args[0])
        return func(*args, **kwargs)

    @staticmethod
    def _takes(a: torch.Tensor, b: torch.Tensor) -> bool:
        on_device = a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        return on_device and a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype and a.dtype != torch.float64


@contextmanager
def partitioned_gemms(num_sms: int) -> Iterator[PartitionedGemms | None]:
    """Matmuls issued inside run on `num_sms` SMs' worth of persistent programs (`PartitionedGemms`); 0: as
    usual (cuBLAS)."""
    if num_sms <= 0:
        yield None
        return
    with PartitionedGemms(num_sms) as mode:
        yield mode

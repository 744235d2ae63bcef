"""A persistent GEMM in Triton whose grid is sized to an SM partition: `persistent_linear(x, weight, num_sms)`.

cuBLAS sizes its grids for the whole device, so on a green-context partition of fewer SMs its GEMMs run a
second, partial wave (measured on an H100: a layer's GEMMs at 1024 tokens took 0.59 ms on 132 SMs, 0.95 ms on
116). Here `num_sms` programs each loop over the output tiles (`tile = pid, pid + num_sms, ...`, grouped by
`GROUP_M` rows of tiles so that neighbouring programs share their weight tiles in L2), so the kernel fills
exactly the partition it is given, and its time scales with the partition's SM count. It computes
`x @ weight.T` (torch.nn.functional.linear's layout, no bias), accumulating in fp32.

Runs under TRITON_INTERPRET=1 on the CPU (with small tiles: `launch`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["launch_config", "persistent_linear"]


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
    """Tiles and launch parameters. On CUDA for half types: 128 x 256 x 64 tiles, 8 warps, 4 stages, the
    configuration of a persistent Triton GEMM probed on an H100 earlier (741 TFLOP/s on Llama-3-8B's layer GEMMs
    at 1024 tokens on the whole GPU, cuBLAS ~825; on 108 SMs within 2% of linear scaling); this kernel itself has
    not run on a GPU yet (`benchmarks/probe_corun.py` measures it). Elsewhere (fp32, the interpreter) small
    tiles."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dict(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=4)
    return dict(block_m=32, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=2)


def persistent_linear(x: torch.Tensor, weight: torch.Tensor, num_sms: int | None = None,
                      **launch: Any) -> torch.Tensor:
    """`x @ weight.T` ([M, K] x [N, K] -> [M, N]) by at most `num_sms` programs, each looping over output tiles:
    the whole of an SM partition of `num_sms` SMs and no more (default: every SM of the device; 1 on the CPU).
    `launch` overrides `launch_config`'s choices (benchmarks)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"persistent_linear takes x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"persistent_linear needs x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
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

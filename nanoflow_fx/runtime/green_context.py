"""Disjoint SM partitions through CUDA green contexts, by the CUDA driver API (ctypes on libcuda, no package).

torch's `GreenContext.create` splits the whole device on every call and keeps the first group, so two of its
contexts land on the same SMs. Here one split gives two disjoint partitions:
`cuDevSmResourceSplitByCount` takes `sms` SMs into one group and leaves the rest as its remainder; each becomes a
green context (`cuDevResourceGenerateDesc`, `cuGreenCtxCreate`) with a stream (`cuGreenCtxStreamCreate`) that torch uses
as an `ExternalStream`. The driver hands out SMs in multiples of 8 (minimum 8): asking for 20 gives 24.

Only one group is split off per call, so the code never depends on the size of the driver's `CUdevResource`
struct beyond its leading fields (type, then the SM count at byte 96).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from nanoflow_fx.errors import NanoFlowError

__all__ = ["SmPartition", "split_sms"]

_CU_DEV_RESOURCE_TYPE_SM = 1
_CU_GREEN_CTX_DEFAULT_STREAM = 0x1
_CU_STREAM_NON_BLOCKING = 0x1
_RESOURCE_BYTES = 1024  # >= sizeof(CUdevResource) in CUDA 12.4-13.x (144 bytes there)
_SM_COUNT_OFFSET = 96  # CUdevResource: int type; unsigned char _internal_padding[92]; then sm.smCount


@dataclass(frozen=True)
class SmPartition:
    """A green-context stream confined to `num_sms` SMs."""

    num_sms: int
    stream: torch.cuda.ExternalStream


_cache: dict[tuple[int, int], tuple[SmPartition, SmPartition]] = {}


def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise NanoFlowError(f"SM partitions need the CUDA driver (libcuda.so.1): {err}") from None
    for name in ("cuDeviceGetDevResource", "cuDevSmResourceSplitByCount", "cuDevResourceGenerateDesc",
                 "cuGreenCtxCreate", "cuGreenCtxStreamCreate"):
        if not hasattr(lib, name):
            raise NanoFlowError(f"this CUDA driver lacks {name} (green contexts need CUDA >= 12.4); "
                                "set NanoFlowConfig.sm_partition='off' or 'streams'")
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        raise NanoFlowError(f"CUDA driver call {what} failed with CUresult {result}; "
                            "set NanoFlowConfig.sm_partition='off' or 'streams'")


def split_sms(sms: int, device: torch.device | int | None = None) -> tuple[SmPartition, SmPartition]:
    """Two disjoint partitions of the device: about `sms` SMs (rounded up to a multiple of 8), and the rest."""
    index = torch.cuda.current_device()
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = device.index if device.index is not None else index
    total = torch.cuda.get_device_properties(index).multi_processor_count
    want = max(8, -(-sms // 8) * 8)
    if want > total - 8:
        raise NanoFlowError(f"an SM partition of {sms} SMs leaves fewer than 8 of the device's {total} SMs; "
                            f"ask for at most {total - 8}")
    key = (index, want)
    if key in _cache:
        return _cache[key]
    torch.cuda.init()
    lib = _driver()
    dev = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    whole = ctypes.create_string_buffer(_RESOURCE_BYTES)
    _check(lib.cuDeviceGetDevResource(dev, whole, _CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    group, rest = ctypes.create_string_buffer(_RESOURCE_BYTES), ctypes.create_string_buffer(_RESOURCE_BYTES)
    groups = ctypes.c_uint(1)
    _check(lib.cuDevSmResourceSplitByCount(group, ctypes.byref(groups), whole, rest, 0, want),
           "cuDevSmResourceSplitByCount")
    if groups.value != 1:
        raise NanoFlowError(f"the driver made {groups.value} groups of {want} SMs, expected 1")
    parts = []
    for resource in (group, rest):
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc")
        _check(lib.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, _CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
        _check(lib.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, _CU_STREAM_NON_BLOCKING, 0),
               "cuGreenCtxStreamCreate")
        num_sms = ctypes.c_uint.from_buffer(resource, _SM_COUNT_OFFSET).value
        parts.append(SmPartition(num_sms, torch.cuda.ExternalStream(stream.value, device=index)))
    _cache[key] = (parts[0], parts[1])
    return _cache[key]

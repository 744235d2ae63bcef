"""Attention backends: one object per kernel family behind one protocol, chosen in one place (`choose`).

A backend says whether it can run here (and why not), whether its steps can be captured in a CUDA graph,
makes the host-side planner a step needs (FlashInfer plans each step's work split on the host), readies its
kernels in the background (`prepare`: FlashInfer's JIT build) and runs the kernel for `nanoflow::paged_attention`.
The captured graph names its backend by `AttentionBackend.name` (a constant of the graph); `resolve(name)` finds
the object that runs it: `get(name)`, or the step context's substitute (`nanoflow_fx.context`), the backend
standing in for it while its own kernels are still being built (`AttentionBackend.interim`). A new backend is one new
module plus a line in `_MODULES`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanoflow_fx.context import current
from nanoflow_fx.errors import NanoFlowError

__all__ = ["AttentionBackend", "AttentionConfig", "DecodeKernel", "Planner", "Preparation", "ScaleValues",
           "BACKEND_NAMES", "choose", "get", "register", "resolve", "stand_in"]

# An FP8 cache's host values (k_scale, v_scale) of a layer's scale tensor, None for a tensor it does not know
# (`PagedKVCache.scale_values_of`).
ScaleValues = Callable[[torch.Tensor], "tuple[float, float] | None"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionConfig:
    """One attention layer's shape and options as a kernel needs them (the model's distinct configurations
    are what a planner plans: Gemma-2 has two, most models one)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float  # the softmax scale the model passes (or 1/sqrt(head_dim) where it passes none)
    sliding_window: int  # <= 0: none
    softcap: float  # <= 0: none


@dataclass(frozen=True)
class DecodeKernel:
    """A kernel that attends a nano-batch's decode rows (its leading one-token requests) in place of the step
    backend's own decode kernel, with launch options: what the memory unit runs on its SM partition, chosen for
    the bandwidth it pulls there (`cost.model.best_decode_kernels`). `backend` plans nothing on the host."""

    backend: str
    launch: tuple[tuple[str, Any], ...] = ()

    def label(self) -> str:
        return self.backend + "".join(f" {k}={v}" for k, v in self.launch)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: Sequence[torch.Tensor],
            config: AttentionConfig, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        qo_indptr, kv_indptr, kv_indices, kv_last_page_len = metadata
        return get(self.backend).run(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, config.scaling,
                                     config.sliding_window, config.softcap, kv_scale, **dict(self.launch))


class Planner(Protocol):
    """Host-side work a backend needs before each step (or each replay of a captured step)."""

    def plan(self, host: Any, kv_indices: torch.Tensor) -> Mapping[AttentionConfig, Any]:
        """Plan a whole step for the captured op: `host`, the step's `AttentionMetadata` in (pinned) host memory;
        `kv_indices`, its page list on the device. Must not wait for the GPU. Returns the plans the step context
        carries to the captured op (`nanoflow_fx.context.StepContext.plans`)."""

    def plan_tables(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                    kv_indices: torch.Tensor) -> Any:
        """Plan one nano-batch's request table (host tensors; the page list on the device) and return the plan
        `AttentionBackend.run_planned` takes for it."""


class AttentionBackend:
    """The protocol every backend implements (defaults: runs anywhere, capturable, needs no planner).

    The KV cache a kernel reads holds the model's dtype or FP8 (e4m3, `nanoflow_fx.ops.kv_quant`): an FP8 cache comes
    with the layer's scales (`kv_scale`, a [2] fp32 tensor on the device: k_scale, v_scale), which every kernel reads
    on the device (so CUDA-graph replays see their current values). A backend that cannot read an FP8 cache says so
    in `unsupported_reason`."""

    name = ""
    plans_on_host = False  # needs `make_planner`'s planner before every step

    def unsupported_reason(self, configs: Sequence[AttentionConfig], dtype: torch.dtype,
                           device: torch.device, kv_dtype: torch.dtype | None = None) -> str:
        """Why this backend cannot run these layers here ("" if it can): `dtype` is the model's (the query's),
        `kv_dtype` the KV cache's (None: the model's)."""
        return ""

    def graph_blocker(self) -> str:
        """Why its steps cannot be captured in a CUDA graph ("" if they can)."""
        return ""

    def run_planned(self, plan: Any, config: AttentionConfig, q: torch.Tensor, kv_cache: torch.Tensor,
                    metadata: Sequence[torch.Tensor], decode: DecodeKernel | None = None,
                    kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Attend one nano-batch: `plan` is what this backend's planner made for exactly that nano-batch (None
        for backends that plan nothing), `metadata` its (qo_indptr, kv_indptr, kv_indices, kv_last_page_len).
        `decode`: the kernel for its decode rows (a backend whose one kernel attends every row, as this default
        assumes, runs them all on it: one launch)."""
        if decode is not None:
            return decode.run(q, kv_cache, metadata, config, kv_scale)
        qo_indptr, kv_indptr, kv_indices, kv_last_page_len = metadata
        return self.run(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, config.scaling,
                        config.sliding_window, config.softcap, kv_scale)

    def make_planner(self, configs: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype,
                     device: torch.device, decode_batch: int | None = None, max_pages: int = 0,
                     kv_dtype: torch.dtype | None = None, scale_values: ScaleValues | None = None,
                     xqa_width: int = 0) -> Planner | None:
        """The planner of eager steps, or (with `decode_batch`) of one CUDA-graph bucket of `decode_batch`
        one-token requests over at most `max_pages` page ids; `dtype` is the query's (`kv_quant.query_dtype`: fp16
        for a bf16 model over e4m3), `kv_dtype` the cache's (None: the same); `scale_values`: an FP8 cache's host
        values of a layer's scale tensor (`PagedKVCache.scale_values_of`); `xqa_width`: decode rows on XQA with
        page tables that wide (`NanoFlowConfig.fp8_attention`: FlashInfer's planner only, `ops.xqa`). None: nothing
        to plan."""
        return None

    def prepare(self, configs: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype,
                device: torch.device, kv_dtype: torch.dtype | None = None,
                fp8_attention: bool = False) -> Preparation | None:
        """Start getting this backend's kernels ready (build, load) in the background while the step is traced (for
        queries of `dtype` over pages of `kv_dtype`, as `make_planner`; with `fp8_attention`, XQA's too); returns
        the `Preparation` under way, or None if there is nothing to get ready."""
        return None

    # A backend whose kernel computes this backend's steps (same inputs, no plan) while `prepare` is under way:
    # the runtime's first steps run on it instead of waiting for the build ("" = none; `interim_backend`).
    interim = ""

    def interim_backend(self, configs: Sequence[AttentionConfig], dtype: torch.dtype,
                        device: torch.device, kv_dtype: torch.dtype | None = None) -> AttentionBackend | None:
        """The backend named by `interim`, if it can stand in here (`stand_in`)."""
        return stand_in(self.interim, configs, dtype, device, kv_dtype) if self.interim else None

    # The kernel `run` calls: a function of `run`'s arguments (backends that plan on the host override `run`).
    kernel: Callable[..., torch.Tensor] | None = None

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
            kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, scaling: float, sliding_window: int,
            softcap: float, kv_scale: torch.Tensor | None = None, **launch: Any) -> torch.Tensor:
        """Attention of q [T, H, D] over the paged cache (its K/V for this step already written) -> [T, H, D].
        `kv_scale`: an FP8 cache's scales (see the class docstring). `launch`: the kernel's launch options
        (`DecodeKernel.launch`), where it has any."""
        if self.kernel is None:
            raise NotImplementedError(f"attention backend {self.name!r} has no kernel")
        return self.kernel(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, scaling,
                           sliding_window, softcap, kv_scale, **launch)


class Preparation:
    """A backend readying its kernels in a background thread (`AttentionBackend.prepare`).

    `work` runs once in a daemon thread (FlashInfer: a JIT build in ninja subprocesses, so the GIL stays free
    for Dynamo). `done()` asks without waiting; `wait()` waits; `failure` is what `work` raised (logged by
    `wait`), `seconds` how long it took (None while it runs)."""

    def __init__(self, work: Callable[[], None], name: str) -> None:
        self.name = name
        self.seconds: float | None = None
        self.failure: BaseException | None = None
        start = time.perf_counter()

        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - reported by wait()
                self.failure = e
            finally:
                self.seconds = time.perf_counter() - start

        self._thread = threading.Thread(target=run, name=f"nanoflow_fx-{name}-prepare", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
        if self.failure is not None:
            log.warning("nanoflow_fx: preparing %s's kernels failed: %s: %s", self.name, type(self.failure).__name__,
                        self.failure)


# name -> module that registers it (imported on first use: Triton and FlashInfer load only when chosen)
_MODULES = {
    "torch": "nanoflow_fx.ops.reference",
    "triton": "nanoflow_fx.ops.triton_attention",
    "flashinfer": "nanoflow_fx.ops.flashinfer_attention",
}
BACKEND_NAMES = ("auto", *_MODULES)
_REGISTRY: dict[str, AttentionBackend] = {}


def register(backend: AttentionBackend) -> AttentionBackend:
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_MODULES)}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]


def resolve(name: str) -> AttentionBackend:
    """The backend that runs `nanoflow::paged_attention(backend=name)` in this thread's step now: the step context's
    substitute (an interim kernel standing in for the step's backend), else `get(name)`."""
    substitute = current().substitute
    return substitute if substitute is not None else get(name)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _triton_runs(dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None,
                 configs: Sequence[AttentionConfig] = ()) -> bool:
    """Whether the Triton kernel can be chosen without asking for it: CUDA, Triton installed, and it can run these
    layers over this cache (at most fp32; an FP8 cache on a GPU whose Triton reads e4m3)."""
    return (device.type == "cuda" and _installed("triton")
            and not get("triton").unsupported_reason(configs, dtype, device, kv_dtype))


def stand_in(name: str, configs: Sequence[AttentionConfig], dtype: torch.dtype, device: torch.device,
             kv_dtype: torch.dtype | None = None) -> AttentionBackend | None:
    """The backend `name`, if it can run these layers here without planning on the host, as what computes another
    backend's attention from the device metadata alone must (an interim backend, a memory unit's `DecodeKernel`);
    None if it cannot."""
    if name == "triton" and not _triton_runs(dtype, device, kv_dtype, configs):
        return None
    backend = get(name)
    if backend.plans_on_host or backend.unsupported_reason(configs, dtype, device, kv_dtype):
        return None
    return backend


def choose(requested: str, configs: Sequence[AttentionConfig], dtype: torch.dtype, device: torch.device,
           kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend `NanoFlowConfig.attention_backend=requested` means for these layers on `device`, over a KV
    cache of `kv_dtype` (None: the model's `dtype`).

    "auto": FlashInfer where it can run (installed, CUDA, fp16/bf16, its head dims), else
    Triton on CUDA where it can run, else the torch reference (logged with the reasons when an FP8 cache is what
    rules them out). An explicit choice that cannot run raises `NanoFlowError` with the reason and the alternatives.
    """
    flashinfer_blocker = _flashinfer_blocker(configs, dtype, device, kv_dtype)
    if requested == "auto":
        if not flashinfer_blocker:
            return get("flashinfer")
        if _triton_runs(dtype, device, kv_dtype, configs):
            return get("triton")
        if device.type == "cuda" and kv_dtype is not None and kv_dtype != dtype:
            log.warning("nanoflow_fx: attention on the torch reference kernel (slow, no CUDA graphs): flashinfer: "
                        "%s; triton: %s", flashinfer_blocker,
                        get("triton").unsupported_reason(configs, dtype, device, kv_dtype) or "not installed")
        return get("torch")
    if requested == "flashinfer" and flashinfer_blocker:
        raise NanoFlowError(f"attention_backend='flashinfer' cannot run here: {flashinfer_blocker}; "
                            "use 'triton' (GPU), 'torch' or 'auto'")
    if requested == "triton":
        if not _installed("triton"):
            raise NanoFlowError("attention_backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise NanoFlowError(f"attention_backend='triton' runs on CUDA (the model is on {device}); "
                                "use 'torch', or set TRITON_INTERPRET=1 to interpret the kernel on the CPU")
    backend = get(requested)
    reason = backend.unsupported_reason(configs, dtype, device, kv_dtype)
    if reason:
        raise NanoFlowError(f"attention_backend={requested!r} cannot run here: {reason}; use 'auto' or 'torch'")
    return backend


def _flashinfer_blocker(configs: Sequence[AttentionConfig], dtype: torch.dtype, device: torch.device,
                        kv_dtype: torch.dtype | None = None) -> str:
    if not _installed("flashinfer"):
        return "flashinfer is not installed (pip install flashinfer-python)"
    return get("flashinfer").unsupported_reason(configs, dtype, device, kv_dtype)

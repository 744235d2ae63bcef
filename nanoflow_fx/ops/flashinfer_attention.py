"""FlashInfer paged attention (optional dependency): planned on the host once per step, run by the captured op.

FlashInfer splits a step's work on the host (`plan`, from the request table) and runs kernels that read that
split from device buffers. `FlashInferPlanner` owns wrappers per distinct attention configuration of the
model (heads, head dim, scale, window, soft-cap: Gemma-2 has two), plans them all before a step, and makes
them the active plans that `nanoflow::paged_attention(backend="flashinfer")` runs in the planning thread.

Eager steps split their rows by kind: the step's leading one-token requests (decode tokens: the scheduler puts
them first) run on FlashInfer's decode kernel, the rest (prefill chunks, which attend causally to their cached
prefix) on its prefill kernel. One prefill kernel over all rows of a mixed step reads the decode rows' KV far
below the bandwidth the decode kernel reaches.
CUDA graphs are captured for pure decode steps only, with decode wrappers of fixed batch and buffers
(`use_cuda_graph`): FlashInfer sizes a captured launch by the plan it was captured with, and a decode bucket's
plans all have the same shape (bucket-many one-token requests), so the graph stays valid when it is re-planned
(outside the graph) before each replay. Our cache layout [pages, 2, page_size, kv_heads, head_dim] is
FlashInfer's NHD layout.

An FP8 (e4m3) cache is planned with `kv_data_type=torch.float8_e4m3fn`. FlashInfer takes the layer's scales as host
floats at run: k_scale multiplied into its softmax scale (free), then `out *= v_scale` (one pass over the output);
steps pass them so, from the cache's host copy (`PagedKVCache.scale_values_of`; a scale of 1.0, the default, is not
applied at all). A CUDA graph freezes them: `PagedKVCache.set_scales` after a capture makes the graph runner capture
again (`CudaGraphRunner.recapture`). Without the host copy (a planner made without it) the device tensors are
applied instead: q * k_scale before the kernel and out * v_scale after (each in fp32, rounded to the query's dtype
once; an fp16 query, a bf16 model's over e4m3 (`kv_quant.query_dtype`), saturating at fp16's range).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoflow_fx.context import current
from nanoflow_fx.ops import kv_quant, xqa
from nanoflow_fx.ops.backend import (
    AttentionBackend,
    AttentionConfig,
    DecodeKernel,
    Preparation,
    ScaleValues,
    register,
)
from nanoflow_fx.ops.metadata import AttentionMetadata

__all__ = ["FlashInferBackend", "FlashInferPlanner"]

log = logging.getLogger(__name__)

# FlashInfer's split work (merge buffers of split-KV) lives here; one per device, shared by all wrappers,
# which run one after another on one stream.
_FLOAT_WORKSPACE_BYTES = 256 * 2**20
_HEAD_DIMS = (64, 128, 256)


@dataclass
class _Plans:
    """One configuration's planned wrappers for the step being run: its first `num_decode` query rows on
    `decode`, the rest on `prefill`."""

    decode: Any
    prefill: Any
    num_decode: int = 0
    scale_values: ScaleValues | None = None  # an FP8 cache's host scales
    xqa: xqa.XqaTables | None = None  # decode rows on XQA (`fp8_attention`) with these tables (the planner's, one
    # for every configuration), not on `decode`


_float_workspaces: dict[torch.device, torch.Tensor] = {}


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    plans_on_host = True
    interim = "triton"  # computes the same steps from the device metadata while FlashInfer's JIT build runs

    def unsupported_reason(self, configs: Sequence[AttentionConfig], dtype: torch.dtype,
                           device: torch.device, kv_dtype: torch.dtype | None = None) -> str:
        if device.type != "cuda":
            return f"FlashInfer runs on CUDA (the model is on {device})"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"FlashInfer kernels take fp16/bf16 (the model is {dtype})"
        if kv_dtype is not None and kv_dtype != dtype and not kv_quant.is_fp8(kv_dtype):
            return f"FlashInfer reads a KV cache of the model's dtype or e4m3 (this cache is {kv_dtype})"
        for config in configs:
            if config.head_dim not in _HEAD_DIMS:
                return f"FlashInfer's kernels take head_dim in {_HEAD_DIMS} (the model has {config.head_dim})"
            if config.num_qo_heads % config.num_kv_heads:
                return f"{config.num_qo_heads} query heads are not a multiple of {config.num_kv_heads} KV heads"
        return ""

    def make_planner(self, configs: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype,
                     device: torch.device, decode_batch: int | None = None, max_pages: int = 0,
                     kv_dtype: torch.dtype | None = None, scale_values: ScaleValues | None = None,
                     xqa_width: int = 0) -> FlashInferPlanner:
        return FlashInferPlanner(configs, page_size, dtype, device, decode_batch, max_pages, kv_dtype, scale_values,
                                 xqa_width)

    def prepare(self, configs: Sequence[AttentionConfig], page_size: int, dtype: torch.dtype,
                device: torch.device, kv_dtype: torch.dtype | None = None,
                fp8_attention: bool = False) -> Preparation:
        """FlashInfer builds (JIT, slow on a fresh machine, where nothing is built yet) and loads its modules when a
        wrapper is first planned. Plan a one-decode, one-prefill table in a thread (the build runs in ninja
        subprocesses, so the GIL is free for Dynamo's trace meanwhile). A failure here is only logged (by
        `Preparation.wait`): the step's own planning then raises it where it belongs."""
        _workspace(device)  # created here, not raced for by the thread

        def build() -> None:
            _lower_priority()
            with torch.cuda.device(device):
                planner = FlashInferPlanner(configs, page_size, dtype, device, kv_dtype=kv_dtype)
                host: dict[str, Any] = dict(dtype=torch.int32, device="cpu")
                qo = torch.tensor([0, 1, 3], **host).pin_memory()
                kv_ptr = torch.tensor([0, 1, 2], **host).pin_memory()
                last = torch.tensor([1, 2], **host).pin_memory()
                planner.plan_tables(qo, kv_ptr, last, torch.zeros(2, dtype=torch.int32, device=device))
                if fp8_attention and kv_dtype is not None:  # (XQA's module: a JIT build of its own)
                    xqa.build(configs, dtype, kv_dtype, page_size)
                torch.cuda.current_stream(device).synchronize()

        return Preparation(build, "flashinfer")

    def run(  # type: ignore[override]  # FlashInfer's planned kernels take no launch options
            self, q: torch.Tensor, kv_cache: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
            kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, scaling: float, sliding_window: int,
            softcap: float, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        config = AttentionConfig(q.shape[1], kv_cache.shape[3], q.shape[2], float(scaling), int(sliding_window),
                                 float(softcap))
        plans = (current().plans or {}).get(config)
        if plans is None:
            raise RuntimeError(f"no FlashInfer plan is active for {config}: the step runner plans every step before "
                               "it runs (the 'flashinfer' backend runs only inside nanoflow_fx's runtime)")
        return _run(plans, config, q, kv_cache, kv_scale=kv_scale)

    def run_planned(self, plan: Any, config: AttentionConfig, q: torch.Tensor, kv_cache: torch.Tensor,
                    metadata: Sequence[torch.Tensor], decode: DecodeKernel | None = None,
                    kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        return _run(plan.plans[config], config, q, kv_cache, metadata if decode is not None else None, decode,
                    kv_scale)


def _run(plans: _Plans, config: AttentionConfig, q: torch.Tensor, kv_cache: torch.Tensor,
         metadata: Sequence[torch.Tensor] | None = None, decode: DecodeKernel | None = None,
         kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run one configuration's planned wrappers: leading one-token rows on the decode kernel (or on `decode`, given
    the nano-batch's `metadata`: its tables cut to those rows are views), the rest on the prefill kernel (one
    output, written in two slices). `config` is the plans' configuration (what `decode` and XQA launch with);
    `kv_scale` an FP8 cache's scales (`_wrapper_run`; `decode` takes them)."""
    num_decode = plans.num_decode

    def attend_decode(rows_q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if decode is None and plans.xqa is not None:
            return xqa.run(plans.xqa, config, rows_q, kv_cache, kv_scale, out, plans.scale_values)
        if decode is None:
            return _wrapper_run(plans.decode, rows_q, kv_cache, kv_scale, out, plans.scale_values)
        assert metadata is not None
        qo, kv_ptr, kv_indices, last = metadata
        rows = (qo[: num_decode + 1], kv_ptr[: num_decode + 1], kv_indices, last[:num_decode])
        result = decode.run(rows_q, kv_cache, rows, config, kv_scale)
        return result if out is None else out.copy_(result)

    if plans.prefill is None or num_decode == q.shape[0]:
        return attend_decode(q)
    if num_decode == 0:
        return _wrapper_run(plans.prefill, q, kv_cache, kv_scale, scale_values=plans.scale_values)
    out = q.new_empty(q.shape[0], q.shape[1], kv_cache.shape[-1])
    attend_decode(q[:num_decode], out[:num_decode])
    _wrapper_run(plans.prefill, q[num_decode:], kv_cache, kv_scale, out[num_decode:], plans.scale_values)
    return out


def _wrapper_run(wrapper: Any, q: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None,
                 out: torch.Tensor | None = None,
                 scale_values: ScaleValues | None = None) -> torch.Tensor:
    """A planned FlashInfer wrapper's run (`out` only when given, as FlashInfer's own callers pass it); over an FP8
    cache with its scales: as host floats where `scale_values` has them, else as device tensors, k_scale folded into q
    and v_scale into the output, each in fp32 (see the module docstring)."""
    given = {} if out is None else {"out": out}
    if kv_scale is None or not kv_quant.is_fp8(kv_cache.dtype):
        return wrapper.run(q, kv_cache, **given)
    values = scale_values(kv_scale) if scale_values is not None else None
    if values is not None:
        k_scale, v_scale = values
        return wrapper.run(q, kv_cache, k_scale=None if k_scale == 1.0 else k_scale,
                           v_scale=None if v_scale == 1.0 else v_scale, **given)
    # (an fp16 query times a large k_scale saturates at fp16's range instead of overflowing: `kv_quant.to_query`)
    result = wrapper.run(kv_quant.to_query(q.float() * kv_scale[0], q.dtype), kv_cache, **given)
    result.copy_(result.float() * kv_scale[1])
    return result


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: niceness is per thread, and the ninja/nvcc processes it starts
    inherit it). The build competes with the step's compilation (Inductor's Triton workers) for the host's cores;
    the first steps need the compiled step, not the build (the interim kernel stands in), so the step goes first.
    Where the caller waits for the build instead, nothing else competes and the build runs as fast."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))
    except (AttributeError, OSError):  # not Linux, or not permitted: build at the normal priority
        pass


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _float_workspaces:
        _float_workspaces[device] = torch.empty(_FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _float_workspaces[device]


def _decode_wrapper(config: AttentionConfig, device: torch.device, decode_batch: int | None, max_pages: int) -> Any:
    import flashinfer

    # Grouped-query heads (>= 4 per KV head) run on tensor cores (FlashInfer's advice), through the same JIT
    # module as prefill, so no second kernel family is built.
    tensor_cores = config.num_qo_heads // config.num_kv_heads >= 4
    if decode_batch is None:
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(device), "NHD", use_tensor_cores=tensor_cores)
    int32: dict[str, Any] = dict(dtype=torch.int32, device=device)
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        _workspace(device), "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=torch.zeros(decode_batch + 1, **int32),
        paged_kv_indices_buffer=torch.zeros(max_pages, **int32),
        paged_kv_last_page_len_buffer=torch.zeros(decode_batch, **int32),
    )


class FlashInferPlanner:
    """The FlashInfer wrappers of all eager steps (decode wrappers for the leading one-token requests, prefill
    wrappers for the rest), or of one CUDA-graph decode bucket (decode wrappers with fixed buffers:
    `decode_batch` one-token requests)."""

    def __init__(
        self,
        configs: Sequence[AttentionConfig],
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        decode_batch: int | None = None,
        max_pages: int = 0,
        kv_dtype: torch.dtype | None = None,
        scale_values: ScaleValues | None = None,
        xqa_width: int = 0,
    ) -> None:
        """With `decode_batch` (and `max_pages`, the bucket's page-list length) the planner serves a captured
        decode graph: every step it plans has exactly `decode_batch` requests of one query token each, so the
        launch FlashInfer captured (its grid is sized by the batch) stays valid when re-planned. `dtype` is the
        query's, `kv_dtype` the cache's (None: the same; FlashInfer builds its kernels per pair); `scale_values`: an
        FP8 cache's host values of a layer's scale tensor (eager runs pass them to FlashInfer: module docstring).
        With `xqa_width` (`NanoFlowConfig.fp8_attention`: an FP8 cache) the decode rows run on XQA (`ops.xqa`)
        with page tables that wide, instead of FlashInfer's decode wrappers."""
        import flashinfer

        _load_built_modules()
        self.page_size, self.dtype, self.graph = page_size, dtype, decode_batch is not None
        self.kv_dtype = kv_dtype if kv_dtype is not None else dtype
        self._planned: torch.cuda.Event | None = None  # when the last plan's host-to-device copies have run
        self.wait_s = 0.0  # host time spent waiting for that
        self.xqa_width, self.device = xqa_width, device
        # XQA's tables hold the step's pages, the same for every configuration: one, filled once per step (a
        # bucket's from the start: its captured launches read them; an eager planner's made for its steps' rows)
        self.xqa_tables = (xqa.XqaTables(decode_batch, xqa_width, page_size, device)
                           if xqa_width and decode_batch is not None else None)
        self.plans: dict[AttentionConfig, _Plans] = {}
        for config in dict.fromkeys(configs):
            prefill = None if self.graph else flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                _workspace(device), "NHD", backend="fa2")
            decode = None if xqa_width else _decode_wrapper(config, device, decode_batch, max_pages)
            self.plans[config] = _Plans(decode, prefill, scale_values=scale_values, xqa=self.xqa_tables)

    def plan(self, host: AttentionMetadata, kv_indices: torch.Tensor) -> dict[AttentionConfig, _Plans]:
        """Plan every configuration for this step; returns the plans, by configuration, that the captured op runs
        when the step context carries them (`nanoflow_fx.context.StepContext.plans`).

        `host` holds the step's metadata in pinned host memory (FlashInfer's planner reads it there; nothing
        waits for the GPU); `kv_indices` is the page list already on the device (copied device to device).
        """
        qo, kv_ptr, _, last, _ = host.tensors()
        self.plan_tables(qo, kv_ptr, last, kv_indices)
        return self.plans

    def plan_tables(self, qo: torch.Tensor, kv_ptr: torch.Tensor, last: torch.Tensor,
                    kv_indices: torch.Tensor) -> FlashInferPlanner:
        """Plan every configuration for the request table (qo_indptr, kv_indptr, kv_last_page_len in pinned host
        memory; the page list on the device) without making the plans active: a nano-batched step gives each
        nano-batch's attention its own planner, passed explicitly (`FlashInferBackend.run_planned`)."""
        # FlashInfer writes each plan into the wrapper's pinned buffer and copies it to the device
        # asynchronously; the host may run a step ahead, so wait until the previous plan's copy has run.
        if self._planned is not None:  # (the event was recorded on the stream current then)
            start = time.perf_counter()
            self._planned.synchronize()
            self.wait_s += time.perf_counter() - start
        num_requests = last.shape[0]
        num_decode = num_requests if self.graph else _leading_single_tokens(qo)
        seq_lens = ((kv_ptr[1:] - kv_ptr[:-1] - 1) * self.page_size + last).clamp_(min=0)
        split = int(kv_ptr[num_decode])  # page-list entries of the decode rows
        pin = qo.is_pinned()
        decode_part = (_pinned(kv_ptr[: num_decode + 1], pin), kv_indices[:split], _pinned(last[:num_decode], pin),
                       _pinned(seq_lens[:num_decode], pin))
        prefill_part = None
        if num_decode < num_requests:
            prefill_part = (_pinned(qo[num_decode:] - qo[num_decode], pin),
                            _pinned(kv_ptr[num_decode:] - split, pin), kv_indices[split:],
                            _pinned(last[num_decode:], pin), _pinned(seq_lens[num_decode:], pin))
        if num_decode and self.xqa_width:  # (an eager planner's tables grow with its steps' decode rows)
            if self.xqa_tables is None or self.xqa_tables.rows < num_decode:
                assert not self.graph  # (a bucket's tables hold its rows from the start)
                self.xqa_tables = xqa.XqaTables(num_decode, self.xqa_width, self.page_size, self.device)
            self.xqa_tables.fill(decode_part[0], decode_part[2], decode_part[1])
        for config, plans in self.plans.items():
            common = dict(
                window_left=config.sliding_window - 1 if config.sliding_window > 0 else -1,
                logits_soft_cap=config.softcap if config.softcap > 0 else None, sm_scale=config.scaling,
                q_data_type=self.dtype, kv_data_type=self.kv_dtype, non_blocking=True,
            )
            heads = (config.num_qo_heads, config.num_kv_heads, config.head_dim, self.page_size)
            plans.num_decode, plans.xqa = num_decode, self.xqa_tables
            if num_decode and not self.xqa_width:
                indptr, indices, last_len, lens = decode_part
                plans.decode.plan(indptr, indices, last_len, *heads, seq_lens=lens, **common)
            if prefill_part is not None:
                qo_p, indptr, indices, last_len, lens = prefill_part
                plans.prefill.plan(qo_p, indptr, indices, last_len, *heads, causal=True, seq_lens=lens, **common)
        self._planned = torch.cuda.Event()
        self._planned.record()
        return self


def _load_built_modules() -> None:
    """Load FlashInfer's already built JIT modules without running ninja first.

    FlashInfer (0.3.x) runs ninja before it loads each JIT module, in one working directory shared by all its
    modules and processes, and locks per module only. Processes that build different modules at once (test
    workers, several servers) leave ninja's shared dependency log unreadable ("premature end of file"), after which
    ninja finds every module out of date and rebuilds it in every process (seen with `ninja -d explain`; the first
    step's planning then waits for that build, however warm the caches: benchmarks/RESULTS.md).
    So a module whose library is newer than its sources, its build file and the installed flashinfer package is
    loaded as built; any other (first build, a changed source, a reinstalled FlashInfer) builds through ninja as
    FlashInfer does. NANOFLOW_FX_FLASHINFER_NINJA=1 restores FlashInfer's own behaviour."""
    global _built_modules_patched
    if _built_modules_patched or os.environ.get("NANOFLOW_FX_FLASHINFER_NINJA") == "1":
        return
    _built_modules_patched = True
    try:
        import flashinfer
        from flashinfer.jit import core
    except ImportError:
        return
    spec_class = getattr(core, "JitSpec", None)
    build = getattr(spec_class, "build", None)
    if spec_class is None or build is None:  # (spec_class None has no build either)
        return
    installed = Path(flashinfer.__file__).stat().st_mtime

    def build_unless_built(self: Any, verbose: bool, need_lock: bool = True) -> None:
        try:
            built = Path(self.jit_library_path).stat().st_mtime
            inputs = [Path(p) for p in self.sources] + [Path(self.ninja_path)]
            if built > installed and all(p.stat().st_mtime <= built for p in inputs):
                return
        except (OSError, AttributeError, TypeError):
            pass  # not built (or not a spec we understand): FlashInfer's own build
        build(self, verbose, need_lock)

    spec_class.build = build_unless_built


_built_modules_patched = False


def _leading_single_tokens(qo_indptr: torch.Tensor) -> int:
    """How many requests at the start of the step have exactly one query token (read on the host)."""
    single = (qo_indptr[1:] - qo_indptr[:-1]) == 1
    return int(single.int().cumprod(0).sum()) if single.numel() else 0


def _pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """Host slices and arithmetic make new tensors; keep them pinned so FlashInfer's copies stay asynchronous."""
    return t.pin_memory() if pin and not t.is_pinned() else t


register(FlashInferBackend())

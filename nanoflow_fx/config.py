"""`NanoFlowConfig`: the one configuration object of nanoflow_fx."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["NanoFlowConfig", "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
SM_PARTITIONS = ("off", "streams", "soft", "hard")


@dataclass(frozen=True)
class NanoFlowConfig:
    """How `optimize()` captures and runs a model. Frozen; round-trips through `to_dict`/`from_dict`.

    The model's dtype and device are taken from the model itself, not from here.
    """

    max_batch_size: int = 64
    """Most sequences in flight at once; `generate()` rejects larger batches."""

    max_seq_len: int = 2048
    """Longest sequence (prompt plus generated tokens) a request may reach."""

    page_size: int = 16
    """Tokens per KV-cache page."""

    num_pages: int | None = None
    """KV-cache pages (per layer). None: enough for `max_batch_size` sequences of `max_seq_len`."""

    max_num_tokens: int = 4096
    """Token budget of one step; longer prefills are split into chunks of at most this many tokens."""

    num_nanobatches: int | Literal["auto"] = 1
    """Nano-batches a step is split into; "auto" lets the search decide (1 until the search exists)."""

    attention_backend: str = "auto"
    """Paged attention kernel: "torch" (reference, CPU and GPU), "triton" (GPU), "flashinfer" (GPU, fp16/bf16,
    one nano-batch; needs `pip install flashinfer-python`), or "auto": flashinfer where it can run, else triton
    on CUDA when Triton imports, else torch."""

    sm_partition: str = "off"
    """How nano-batched steps (num_nanobatches > 1) run on CUDA: "off" (one stream, in the Schedule's order),
    "streams" (one stream per execution unit, events for cross-unit waits), "soft" (the memory-bound unit's
    stream confined to `memory_sms` SMs by a green context, the others free), or "hard" (the compute unit on
    the remaining SMs too). Measured on an H100 (benchmarks/RESULTS.md): at decode batch 64 on an 8B model two
    nano-batches are 2.2-2.4x slower than one (each nano-batch reads every weight again), so "off" and
    num_nanobatches=1 are the defaults."""

    memory_sms: int = 32
    """SMs of the memory-bound unit's partition ("soft"/"hard"); rounded up to a multiple of 8."""

    inductor: bool = False
    """Compile the step's ops between attention calls with Inductor (fuses HF's elementwise work: norms, RoPE,
    activations, residual adds); attention calls stay as captured. One nano-batch only. On an H100 it took an
    8B model's batch-64 decode step from 13.1 to 10.6 ms (benchmarks/RESULTS.md), for more compile time in
    optimize(): +8.5 to +12.7 s measured with Inductor's caches warm, +33 to +41 s cold (identical layers compile
    once)."""

    fuse_linears: bool = True
    """Merge linear layers that read the same input into one GEMM (Q/K/V projections, gate/up): `optimize()`
    moves their weights into one buffer, each parameter becoming a view of it (no extra memory; the eager model
    computes as before), and the captured step runs one GEMM per group. See `nanoflow_fx.capture.fuse_linears`."""

    cuda_graphs: bool = True
    """On CUDA with the "triton" or "flashinfer" backend: replay decode-sized steps as CUDA graphs."""

    check_capture: bool = True
    """Compare the captured step with the eager model on a probe input in `optimize()`."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "page_size", "max_num_tokens"):
            _require_positive_int(name, getattr(self, name))
        if self.num_pages is not None:
            _require_positive_int("num_pages", self.num_pages)
        if self.num_nanobatches != "auto":
            _require_positive_int("num_nanobatches", self.num_nanobatches)
        _require_positive_int("memory_sms", self.memory_sms)
        if self.sm_partition not in SM_PARTITIONS:
            raise ValueError(f"NanoFlowConfig.sm_partition={self.sm_partition!r} is not one of {SM_PARTITIONS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"NanoFlowConfig.attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )
        if self.inductor and self.nanobatched:
            raise ValueError("NanoFlowConfig.inductor=True compiles the whole step; it needs num_nanobatches=1")
        for name in ("check_capture", "cuda_graphs", "inductor", "fuse_linears"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NanoFlowConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def nanobatched(self) -> bool:
        """Whether steps are split into more than one nano-batch ("auto" means 1 until the search exists)."""
        return self.num_nanobatches != "auto" and self.num_nanobatches > 1

    @property
    def pages_per_seq(self) -> int:
        """Pages one sequence of `max_seq_len` tokens needs."""
        return -(-self.max_seq_len // self.page_size)

    @property
    def total_pages(self) -> int:
        """KV-cache pages to allocate per layer."""
        return self.num_pages if self.num_pages is not None else self.max_batch_size * self.pages_per_seq

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NanoFlowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"NanoFlowConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NanoFlowConfig.{name} must be a positive int, got {value!r}")

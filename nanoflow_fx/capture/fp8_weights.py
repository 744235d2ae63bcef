"""FP8 weights of a model's linear layers: `Fp8Linear` modules, made by quantising the model's own linears
(`NanoFlowConfig.linear_dtype="fp8_e4m3"`) or converted from FP8 linears other libraries made.

An `Fp8Linear` is an `nn.Linear` whose `weight` is float8_e4m3fn [out, in] with one fp32 scale per output channel
(`weight_scale` [out, 1]); its forward calls `nanoflow::fp8_linear` (`ops.fp8`: per-token activation scales,
the reference arithmetic), so the eager model computes what the FP8 step computes, and the captured step has one
node per linear for the `fp8_linears` pass to lower to `torch._scaled_mm`.

`quantize_linears(model, quantize)` makes them, in place, before capture:
- FP8 linears another library made are converted where their tensors allow it, without copying the FP8 data:
  torchao's `Float8Tensor` weights (per-row or per-tensor scales; `quantize_(model,
  Float8DynamicActivationFloat8WeightConfig(...))`), transformers' `FbgemmFp8Linear` (per-channel) and its
  FineGrainedFP8 `FP8Linear` where one scale covers the whole weight or whole rows. Activations are then always
  quantised per token, dynamically (at least as fine as those libraries' per-tensor or static activation scales; a
  weight-only FP8 model gains activation quantisation, so it is taken only when asked for with `quantize`).
  Block-wise scales (transformers' FineGrainedFP8 blocks smaller than the weight, torchao's per-group) are refused
  with `UnsupportedModelError`.
- With `quantize`, every other linear that qualifies (`nn.Linear` in the model's dtype with both sizes multiples
  of 16, not the LM head, not a MoE router, weight not shared) is quantised; its original weight is kept by the
  returned `Fp8Weights` until `commit()`, so `undo()` restores the model exactly if `optimize()` fails. `park()`
  moves those originals off the GPU (the KV cache is sized from the memory left after it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from nanoflow_fx.errors import NanoFlowError, UnsupportedModelError
from nanoflow_fx.ops.fp8 import FP8_DTYPE, fp8_gemm_error, fp8_linear, quantize_rows

__all__ = ["Fp8Linear", "Fp8Weights", "has_fp8_linears", "quantize_linears"]

log = logging.getLogger(__name__)

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT8 = {d for d in vars(torch).values() if isinstance(d, torch.dtype) and "float8" in str(d)}


class Fp8Linear(torch.nn.Linear):
    """`nn.Linear` with a float8_e4m3fn `weight` [out, in] and an fp32 `weight_scale` [out, 1] (the full-precision
    weight ~= weight * weight_scale, row by row); `bias` (or None) in the model's dtype. Computes
    `nanoflow::fp8_linear`. `quantize_linears` makes one by changing a linear's class in place: the module object,
    its hooks and its place in the model stay."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)


class _Dequantised(Fp8Linear):
    """An `Fp8Linear` computing in full precision: its dequantised weight, activations as they come
    (`Fp8Weights.full_precision`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() * self.weight_scale).to(x.dtype)
        return torch.nn.functional.linear(x, weight, self.bias)


@dataclass
class _Changed:
    """One module `quantize_linears` changed, and what restores it: its class, its parameter and buffer objects,
    and the data of the parameters whose data it replaced (a quantised weight's full-precision data)."""

    module: torch.nn.Module
    cls: type
    parameters: dict[str, torch.nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    data: dict[str, torch.Tensor]

    @classmethod
    def of(cls, m: torch.nn.Module, replaced: tuple[str, ...] = ()) -> _Changed:
        return cls(m, type(m), dict(m._parameters), dict(m._buffers),
                   {k: p.data for k, p in m._parameters.items() if k in replaced and p is not None})


class Fp8Weights:
    """What `quantize_linears` changed (and the `Fp8Linear`s it found, unchanged): `undo()` restores it, `park()`
    moves the full-precision weights it keeps for that to the CPU, `commit()` drops them (then it cannot be
    undone)."""

    def __init__(self, changed: list[_Changed], quantized: int, converted: int) -> None:
        self.changed, self.quantized, self.converted = changed, quantized, converted

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [c.module for c in self.changed]

    @torch.no_grad()
    def park(self) -> None:
        for c in self.changed:
            c.data = {k: d.to("cpu") for k, d in c.data.items()}

    def commit(self) -> None:
        self.changed = []

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """Within it no linear computes in FP8: those it quantised as they did before (their own class, their
        full-precision weights, wherever `park()` left them), the others (converted from another library's FP8, or
        quantised by an earlier `optimize()`: no full precision left) on their dequantised weights with activations
        unquantised. After it, all is as before."""
        swapped = []
        for c in self.changed:
            m = c.module
            weight = cast(torch.nn.Parameter, m.weight)
            swapped.append((m, m.__class__, weight, weight.data))
            if "weight" in c.data:
                m.__class__ = c.cls
                weight.data = c.data["weight"].to(weight.device)
            else:
                m.__class__ = _Dequantised
        try:
            yield
        finally:
            for m, cls, weight, q in swapped:
                m.__class__ = cls
                weight.data = q

    @torch.no_grad()
    def undo(self) -> None:
        for c in reversed(self.changed):
            m = c.module
            device = cast(torch.Tensor, m.weight).device
            m.__class__ = c.cls
            m._parameters.clear()
            m._parameters.update(c.parameters)
            m._buffers.clear()
            m._buffers.update(c.buffers)
            for name, data in c.data.items():
                param = c.parameters[name]
                assert param is not None
                param.data = data.to(device)
        self.changed = []


def has_fp8_linears(model: torch.nn.Module) -> bool:
    """Whether the model has linear layers with FP8 weights (its own `Fp8Linear`s, or another library's)."""
    return any(isinstance(m, torch.nn.Linear) and _weight_dtype(m) in _FLOAT8 for m in model.modules())


@torch.no_grad()
def quantize_linears(model: torch.nn.Module, quantize: bool) -> Fp8Weights:
    """Make the model's FP8 linears `Fp8Linear`s and, with `quantize`, quantise its other qualifying linears (see
    the module docs). Raises `NanoFlowError` where FP8 GEMMs cannot run (the model's dtype, the device; before
    changing anything) and `UnsupportedModelError` for FP8 linears it cannot convert."""
    changed: list[_Changed] = []
    quantized = converted = 0
    embedding = _embedding(model)
    dtype = embedding.dtype
    if quantize or has_fp8_linears(model):
        _check_runs(embedding.device, dtype, "linear_dtype='fp8_e4m3'" if quantize else "the model's FP8 linears")
    excluded = _excluded(model)
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if _weight_dtype(m) in _FLOAT8:
            if type(m) is not Fp8Linear:
                changed.append(_convert(name, m, quantize, dtype))
                converted += 1
            elif m.weight.dtype != FP8_DTYPE:  # `model.to(dtype)` cast the FP8 values themselves
                raise UnsupportedModelError(
                    f"{name}: an FP8 linear whose weight was cast to {m.weight.dtype} after nanoflow_fx quantised it "
                    "(model.to(dtype)?); its scales no longer match: reload the model")
            else:  # (already an Fp8Linear: an earlier optimize()'s; recorded, unchanged, for `full_precision`)
                changed.append(_Changed.of(m))
        elif quantize and id(m) not in excluded and _qualifies(m):
            changed.append(_quantize(m))
            quantized += 1
    if quantized or converted:
        log.info("nanoflow_fx: FP8 linears: %d quantised, %d converted from another library's FP8", quantized,
                 converted)
    return Fp8Weights(changed, quantized, converted)


def _embedding(model: Any) -> torch.Tensor:
    """The input embedding's weight: its dtype is the model's (FP8 linears compute in it), its device the model's."""
    return cast(torch.Tensor, model.get_input_embeddings().weight)


def _check_runs(device: torch.device, dtype: torch.dtype, why: str) -> None:
    if dtype not in _MODEL_DTYPES:
        raise NanoFlowError(f"{why}: FP8 linears compute in the model's dtype, which must be float32, float16 or "
                            f"bfloat16, not {dtype}")
    error = fp8_gemm_error(device, dtype)
    if error:
        raise NanoFlowError(f"{why}: {error}; use linear_dtype='auto' (and an unquantised model) on this device")


def _weight_dtype(m: torch.nn.Module) -> torch.dtype | None:
    weight = getattr(m, "weight", None)
    qdata = getattr(weight, "qdata", None)  # torchao's float8 tensor subclass: its FP8 data
    return (qdata if isinstance(qdata, torch.Tensor) else weight).dtype if isinstance(weight, torch.Tensor) else None


def _excluded(model: torch.nn.Module) -> set[int]:
    """Linears that stay in the model's dtype: the LM head (and any linear sharing its weight) and MoE routers
    (a linear named `gate`/`router` beside an `experts` module)."""
    out: set[int] = set()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, torch.nn.Module):
        out.add(id(head))
    owners: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(m)
    out.update(id(m) for group in owners.values() if len(group) > 1 for m in group)  # shared (tied) weights
    for parent in model.modules():
        if "experts" in parent._modules:
            out.update(id(parent._modules[n]) for n in ("gate", "router") if n in parent._modules)
    return out


def _qualifies(m: torch.nn.Linear) -> bool:
    """A linear the FP8 GEMM takes: a plain `nn.Linear` in a model dtype, both sizes multiples of 16."""
    w = m.weight
    return (type(m) is torch.nn.Linear and type(w) is torch.nn.Parameter and w.dtype in _MODEL_DTYPES
            and w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)


def _quantize(m: torch.nn.Linear) -> _Changed:
    record = _Changed.of(m, replaced=("weight",))
    q, scale = quantize_rows(m.weight.data)
    m.weight.data = q
    m.weight.requires_grad_(False)
    m.register_buffer("weight_scale", scale)
    m.__class__ = Fp8Linear
    return record


def _convert(name: str, m: torch.nn.Linear, quantize: bool, dtype: torch.dtype) -> _Changed:
    """Another library's FP8 linear as an `Fp8Linear` (bias in the model's `dtype`), sharing its FP8 data."""
    kind = f"{type(m).__module__}.{type(m).__qualname__}"
    record, bias = _Changed.of(m), m.bias
    qdata, scale, refuse = _foreign_fp8(m, quantize)
    if refuse:
        raise UnsupportedModelError(f"{name} ({kind}): {refuse}")
    n, k = qdata.shape
    if qdata.dtype != FP8_DTYPE or n % 16 or k % 16:
        raise UnsupportedModelError(
            f"{name} ({kind}): FP8 linears need float8_e4m3fn weights with both sizes multiples of 16, got "
            f"{qdata.dtype} {tuple(qdata.shape)}; load this model unquantised and pass linear_dtype='fp8_e4m3'")
    scale = scale.float().reshape(-1, 1)
    scale = scale.expand(n, 1).contiguous() if scale.shape[0] == 1 else scale
    m.__class__ = Fp8Linear
    m._parameters["weight"] = torch.nn.Parameter(qdata, requires_grad=False)
    m._parameters.pop("weight_scale", None)
    m.register_buffer("weight_scale", scale)
    if bias is not None and bias.dtype != dtype:
        m._parameters["bias"] = torch.nn.Parameter(bias.data.to(dtype), requires_grad=False)
    return record


def _foreign_fp8(m: torch.nn.Linear, quantize: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(FP8 weight [N, K], its scales (per row or one), why not) of another library's FP8 linear."""
    cls, weight = type(m).__qualname__, cast(Any, m.weight)
    if hasattr(weight, "qdata") and type(weight).__qualname__ == "Float8Tensor":  # torchao
        qdata, scale = weight.qdata, weight.scale
        if list(getattr(weight, "block_size", ())) not in ([1, qdata.shape[1]], list(qdata.shape)):
            return qdata, scale, (f"torchao float8 weights with block size {weight.block_size} (per-group scales); "
                                  "nanoflow_fx's FP8 linears take per-row or per-tensor scales (PerRow, PerTensor)")
        if getattr(weight, "act_quant_kwargs", None) is None and not quantize:
            return qdata, scale, ("torchao float8 weight-only quantisation: nanoflow_fx's FP8 linears quantise the "
                                  "activations per token too; pass linear_dtype='fp8_e4m3' to accept that")
        return qdata, scale, ""
    if cls == "FbgemmFp8Linear":  # transformers' FbgemmFp8Config: per-channel weights, per-token activations
        return weight.data, cast(torch.Tensor, m.weight_scale).data, ""
    if cls == "FP8Linear" and hasattr(m, "weight_scale_inv"):  # transformers' FineGrainedFP8Config
        scale, block = cast(torch.Tensor, m.weight_scale_inv).data, getattr(m, "block_size", None)
        # (a block as large as the weight is one scale; blocks of one row spanning it, one scale per row)
        per_row = block is not None and block[0] == 1 and scale.dim() == 2 and scale.shape[1] == 1
        if block is not None and scale.numel() != 1 and not per_row:
            return weight.data, scale, (
                f"block-wise FP8 scales (weight_block_size={m.block_size}) of transformers' FineGrainedFP8Config; "
                "nanoflow_fx's FP8 linears take one scale per output channel: load the model unquantised and pass "
                "linear_dtype='fp8_e4m3'")
        return weight.data, scale, ""
    return weight.data, weight.data, (f"a linear with {weight.dtype} weights of a kind nanoflow_fx does not know; "
                                      "load the model unquantised and pass linear_dtype='fp8_e4m3'")

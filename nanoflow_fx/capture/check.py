"""The check of a captured step against the eager model: a probe of two packed prompts, every logit compared.

`optimize()` runs it on the step it traced, replicated or loaded (a replicated or loaded step that fails is
discarded and every layer traced again); the switch from the interim attention kernel runs it again on the
backend's own kernel, against the same eager logits. The eager model computes what the step computes: over an FP8
KV cache it attends over K/V fake-quantised the same way (`capture.kv_scales.eager_logits`), and its FP8 linears
compute their reference arithmetic, so the check isolates the capture from FP8's own cost, which it does not
measure; keys or values the probe finds beyond the FP8 range at their scales (clamped) are logged as a warning.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import PreTrainedModel

from nanoflow_fx.capture.fp8_weights import Fp8Weights, has_fp8_linears
from nanoflow_fx.capture.kv_scales import clamped_layers, eager_logits
from nanoflow_fx.capture.tensor_parallel import vocab_size
from nanoflow_fx.errors import CaptureMismatchError
from nanoflow_fx.runtime.step_runner import StepRunner

log = logging.getLogger(__name__)

__all__ = ["PROBE_LENGTHS", "check_against_eager", "check_probe", "probe_prompts"]

PROBE_LENGTHS = (5, 3)  # two requests of different lengths: packing, per-request causality and paging
# How far the captured step's probe logits may be from the eager model's. fp32/fp64: max |diff| relative to
# the largest logit (they differ only by reduction order: ~1e-6 seen in fp32). Half precision: every layer
# rounds (bf16 keeps 8 significant bits), so a max over ~10^6 logits of a large model is a tail statistic
# (an 8B random-weight model reached 5.2% of the largest logit with a correct step); the check is instead each
# token row's RMS difference relative to that row's RMS logit. Rounding gives ~1% there; a real fault (a
# wrong mask, position, window or cache slot) changes a whole row's distribution, far above 2^-4.
# fp64 models get fp32's bound: HF's eager attention takes its softmax in fp32 whatever the model's dtype.
# FP8 (an FP8 KV cache, FP8 linears): the eager model quantises the same K/V and activations, but quantisation is
# discontinuous: where a value the eager model quantises differs from the step's by a last bit (reduction order, bf16
# rounding, the FP8 GEMM's accumulation), a value next to a rounding boundary of e4m3 lands on the neighbouring e4m3
# value (2^-4 to 2^-3 of it away) in one and not the other, which moves what the next layers compute by far more
# than a last bit. Two correct FP8 computations of a model therefore differ by FP8's own noise carried through its
# layers: on random-weight Llamas of the 8B shape in bf16 the eager FP8 model is as far from the same model
# computed in fp32 as the step is from it (row RMS 0.09 at one layer, 0.54 at 32: benchmarks/RESULTS.md). No such
# flip moves the logits further than quantising at all does, so the tolerance grows by that: the distance, in the
# check's own measure, between the eager model's logits with and without FP8 (its K/V unquantised, the linears
# optimize() quantised back in full precision, those converted from another library's FP8 on their dequantised
# weights: `Fp8Weights.full_precision`). A capture fault still moves whole rows, far beyond both.
PROBE_MAX_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
PROBE_ROW_RMS_TOLERANCE = 2**-4


def probe_prompts(model: PreTrainedModel, max_batch_size: int) -> list[list[int]]:
    """The probe: two prompts of different lengths (packing, per-request causality and paging), seeded; one prompt
    only if the batch holds one."""
    gen = torch.Generator().manual_seed(0)
    vocab = vocab_size(model)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROBE_LENGTHS[:max_batch_size]]


@torch.no_grad()
def check_against_eager(model: PreTrainedModel, runner: StepRunner, max_batch_size: int,
                        fp8: Fp8Weights | None = None) -> tuple[list[list[int]], torch.Tensor, torch.Tensor | None]:
    """Run the captured step on a probe (two packed prompts) and compare every logit with the eager model (over
    fake-quantised K/V where the cache is FP8; its FP8 linears computing their reference); returns the probe, the
    eager logits and, where FP8 is in play (the cache, or the linears `fp8` quantised), the eager logits without
    it (a later check of another attention kernel reuses them: `check_probe`'s arguments)."""
    prompts = probe_prompts(model, max_batch_size)
    cache = runner.kv_cache
    scales = cache.scale_values if cache.quantized else None
    want, recorded = eager_logits(model, prompts, scales)
    unquantised = None
    if scales is not None or fp8 is not None and fp8.changed:
        with fp8.full_precision() if fp8 is not None else contextlib.nullcontext():
            unquantised = eager_logits(model, prompts)[0]
    check_probe(model, runner, prompts, want, unquantised)
    if scales is not None and recorded is not None:
        over = clamped_layers(recorded, scales)
        if over:
            log.warning("nanoflow_fx: the probe's keys/values exceed the FP8 KV cache's range (448 x scale) in "
                        "%d of %d layers (up to %.3g x), clamped there: layers %s; calibrate_kv_scales=True sets "
                        "scales that hold them", len(over), len(scales), max(max(r) for r in over.values()),
                        sorted(over))
    return prompts, want, unquantised


@torch.no_grad()
def check_probe(model: PreTrainedModel, runner: StepRunner, prompts: list[list[int]], want: torch.Tensor,
                unquantised: torch.Tensor | None = None) -> None:
    """Raise `CaptureMismatchError` unless the runner's step gives the eager logits `want` on `prompts`; with
    `unquantised` (the eager logits without FP8, `want` being with it), within the tolerance plus FP8's own
    distance (see the comment above PROBE_MAX_TOLERANCE)."""
    got = runner.run_prompts(prompts, all_logits=True).float()
    dtype, fp8 = runner.kv_cache.model_dtype, has_fp8_linears(model)
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    if dtype in PROBE_MAX_TOLERANCE and not fp8:
        slack = (unquantised - want).abs().max().item() if unquantised is not None else 0.0
        ok = diff <= PROBE_MAX_TOLERANCE[dtype] * scale + slack
        measure = (f"max |logit diff| {diff:.3g} > {PROBE_MAX_TOLERANCE[dtype]:.3g} x logit scale {scale:.3g}"
                   f"{_allowed(slack)}")
    else:
        row_rms = _row_rms(got, want)
        slack = _row_rms(unquantised, want) if unquantised is not None else 0.0
        ok = row_rms <= PROBE_ROW_RMS_TOLERANCE + slack
        measure = (f"relative RMS logit diff of a token row {row_rms:.3g} > {PROBE_ROW_RMS_TOLERANCE:.3g}"
                   f"{_allowed(slack)} (max |logit diff| {diff:.3g}, logit scale {scale:.3g})")
    if not ok:
        kernel = runner.interim.name if runner.interim is not None else runner.backend.name
        arithmetic = f"{dtype} with FP8 linears" if fp8 else str(dtype)
        raise CaptureMismatchError(
            f"{type(model).__name__} ({model.config.model_type}): the captured nanoflow step ({kernel} attention) "
            f"differs from the eager model on the probe by {measure}, dtype {arithmetic}; "
            "this model uses something nanoflow_fx does not reproduce; please report it with the model name"
        )


def _row_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest token row's RMS difference relative to that row's RMS logit."""
    return ((got - want).pow(2).mean(-1).sqrt() / want.pow(2).mean(-1).sqrt().clamp(min=1e-6)).max().item()


def _allowed(slack: float) -> str:
    return f" + {slack:.3g}, FP8's own effect on the eager model" if slack else ""

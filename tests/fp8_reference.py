"""FP8 linears in tests: the config, and a torch reference that fake-quantises a plain model's linears as FP8
linears promise to compute them (written here apart from the library)."""

from __future__ import annotations

import dataclasses

import torch

from nanoflow_fx.capture.fp8_weights import Fp8Linear
from tests.helpers import DEFAULT_CONFIG
from tests.tiny_models import VOCAB

__all__ = ["FP8", "TINY", "close", "expected_fp8", "fake_quant", "fake_quantised_reference", "fp8_modules",
           "random_prompts", "scaled_mm_reference"]

FP8 = dataclasses.replace(DEFAULT_CONFIG, linear_dtype="fp8_e4m3")
TINY = torch.finfo(torch.float32).tiny


def quant(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [..., K] as e4m3 with one fp32 scale per row (amax / 448): the quantisation FP8 linears promise, written
    here apart from the library."""
    s = (t.abs().amax(-1, keepdim=True).float() / 448).clamp(min=TINY)
    return (t.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def fake_quant(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to e4m3 with one scale per row and back, in fp32 (`quant`)."""
    q, s = quant(t)
    return q.float() * s


def fake_quantised_reference(model: torch.nn.Module, names: set[str]) -> torch.nn.Module:
    """`model` (a plain HF model) with the linears `names` fake-quantised: weights per output channel, inputs per
    token (a forward pre-hook)."""
    for name, m in model.named_modules():
        if name in names:
            m.weight.data = fake_quant(m.weight.data).to(m.weight.dtype)
            m.register_forward_pre_hook(lambda _, args: (fake_quant(args[0]).to(args[0].dtype), *args[1:]))
    return model


def scaled_mm_reference(model: torch.nn.Module, names: set[str], use_fast_accum: bool) -> torch.nn.Module:
    """`model` (a plain HF model) with the linears `names` computed as FP8 linears compute them on a GPU: weights
    and inputs quantised by `quant`, multiplied by the FP8 tensor cores (`torch._scaled_mm`, row-wise scales, the
    model's dtype out), the bias added after."""
    for name, m in model.named_modules():
        if name in names:
            wq, ws = quant(m.weight.data)

            def forward(x: torch.Tensor, wq: torch.Tensor = wq, ws: torch.Tensor = ws,
                        bias: torch.Tensor | None = m.bias) -> torch.Tensor:
                xq, xs = quant(x.reshape(-1, x.shape[-1]))
                out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=x.dtype,
                                       use_fast_accum=use_fast_accum)
                return (out if bias is None else out + bias).reshape(*x.shape[:-1], -1)

            m.forward = forward
    return model


def expected_fp8(model: torch.nn.Module) -> set[str]:
    """The linears FP8 linears quantise: every nn.Linear but the LM head (the tiny models' sizes are multiples of
    16; MoE routers and experts are not nn.Linear in transformers 5)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}


def fp8_modules(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def random_prompts(lengths: tuple[int, ...] = (9, 5, 12), seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |difference| relative to the largest logit (the capture check's fp32 measure)."""
    return ((got.float() - want.float()).abs().max() / want.abs().max().clamp(min=1.0)).item()

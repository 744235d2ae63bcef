"""Code the benchmarks share: the model shapes they run, built from a config (random weights, no download), and
the Markdown tables they print.

Benchmarks import it as `benchmarks.common`, so they run as modules from the repo root:

    python3 -m benchmarks.bench_offline --help
    python3 -m benchmarks.research.probe_corun --help

(the repo root is then on `sys.path`, so `nanoflow_fx` is this checkout's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["SHAPES", "build_model", "engine_with_requests", "print_markdown_table"]

# Llama shapes by name: "llama3-8b" is Llama-3-8B's (8.03 B parameters), "tiny" a small one for smoke runs.
SHAPES: dict[str, dict[str, int | float]] = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
}


def build_model(shape: str, device: str, dtype: torch.dtype, fp8_linears: bool = False,
                num_layers: int | None = None) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` of `SHAPES[shape]` (`num_layers` of its layers, all by default) with random weights,
    made directly on `device` in `dtype`, in eval mode (token ids: bos 1, eos 2, pad 0). With `fp8_linears` its
    linears but the LM head are made as nanoflow_fx's FP8 linears (e4m3, a scale per output channel), one at a time,
    so the full-precision model never exists: a 70B shape fits one H200 so (as `optimize()` with
    `linear_dtype="fp8_e4m3"` would quantise them)."""
    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": num_layers} if num_layers else {})},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if fp8_linears:
        return _build_fp8(config, device, dtype)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)


@torch.no_grad()
def _build_fp8(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from nanoflow_fx.capture.fp8_weights import Fp8Linear
    from nanoflow_fx.ops.fp8 import quantize_rows

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    std = config.initializer_range
    head = model.get_output_embeddings()
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if type(m) is torch.nn.Linear and m is not head and name == "weight":
                # The e4m3 weight is allocated first, with the last linear's temporaries given back to the driver:
                # it gets a segment of its own, not the part of a temporary's that nothing else could use after
                # (such leftovers stay reserved and shrink the KV cache sized after them)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                q = torch.empty(p.shape, device=device, dtype=torch.float8_e4m3fn)
                values, scale = quantize_rows(torch.empty(p.shape, device=device, dtype=dtype).normal_(0, std))
                q.copy_(values)
                del values
                m.weight = torch.nn.Parameter(q, requires_grad=False)
                m.register_buffer("weight_scale", scale)
                m.__class__ = Fp8Linear
                continue
            data = torch.empty(p.shape, device=device, dtype=dtype)
            data = data.fill_(1.0) if "norm" in type(m).__name__.lower() else data.normal_(0, std)
            setattr(m, name, torch.nn.Parameter(data, requires_grad=False))
    with torch.device(device):  # (its inv_freq buffer computed on the device)
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model


def engine_with_requests(shape: str, device: str, config: str, requests: int, prompt: int = 1024,
                         new: int = 512) -> Any:
    """`shape` (random weights; bf16 on CUDA, fp32 on the CPU) optimized with `config` (NanoFlowConfig fields as
    JSON), its attention backend ready, and its engine holding `requests` greedy requests of `prompt` random tokens
    and `new` to generate, no step run yet: the model (`model.nanoflow.engine` steps them)."""
    import json

    import nanoflow_fx
    from nanoflow_fx.runtime.sampling import SamplingParams

    torch.manual_seed(0)
    model: Any = build_model(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig.from_dict(json.loads(config)))
    model.nanoflow.wait_until_ready()  # time the chosen attention backend, not the interim kernel
    greedy = SamplingParams(False, 1.0, 0, 1.0, (), 0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(requests):
        model.nanoflow.engine.add_request(torch.randint(3, model.config.vocab_size, (prompt,), generator=gen).tolist(),
                                          greedy, new)
    return model


def print_markdown_table(columns: Sequence[tuple[str, Callable[[dict[str, Any]], str]]],
                         rows: Sequence[dict[str, Any]]) -> None:
    """Print `rows` as a Markdown table: one (header, cell of a row) pair per column."""
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell in columns) + " |", flush=True)


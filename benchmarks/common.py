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

__all__ = ["SHAPES", "build_model", "print_markdown_table"]

# Llama shapes by name: "llama3-8b" is Llama-3-8B's (8.03 B parameters), "tiny" a small one for smoke runs.
SHAPES: dict[str, dict[str, int | float]] = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
}


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` of `SHAPES[shape]` with random weights, made directly on `device` in `dtype`, in eval
    mode (token ids: bos 1, eos 2, pad 0)."""
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)


def print_markdown_table(columns: Sequence[tuple[str, Callable[[dict[str, Any]], str]]],
                         rows: Sequence[dict[str, Any]]) -> None:
    """Print `rows` as a Markdown table: one (header, cell of a row) pair per column."""
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell in columns) + " |", flush=True)


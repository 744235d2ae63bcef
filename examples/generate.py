"""Generate with an optimized model built from a config (random weights; no downloads).

    python examples/generate.py                       # tiny Llama on the CPU, fp32
    python examples/generate.py --device cuda         # Llama-3-8B shape on the GPU, bf16
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nanoflow_fx

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**(TINY if shape == "tiny" else LLAMA3_8B), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=["tiny", "llama3-8b"], help="default: tiny on CPU, 8B on CUDA")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.9) instead of greedy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shape = args.model or ("tiny" if args.device == "cpu" else "llama3-8b")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)

    model = build_model(shape, args.device, dtype)
    max_seq_len = args.prompt_len + args.max_new_tokens
    start = time.perf_counter()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=args.batch_size, max_seq_len=max_seq_len))
    optimize_s = time.perf_counter() - start

    input_ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.prompt_len), device=args.device)
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.9) if args.sample else dict(do_sample=False)
    model.generate(input_ids, max_new_tokens=2, **sampling)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, **sampling)
    _sync(args.device)
    seconds = time.perf_counter() - start
    new_tokens = out[:, args.prompt_len :]

    print(f"model: {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {dtype}) on {args.device}")
    print(f"optimize(): {optimize_s:.1f} s")
    for row in range(min(2, args.batch_size)):
        print(f"sequence {row} new tokens: {new_tokens[row].tolist()}")
    print(f"generated {new_tokens.numel()} tokens in {seconds:.2f} s: {new_tokens.numel() / seconds:.1f} tokens/s "
          f"(batch {args.batch_size}, prompt {args.prompt_len}, {args.max_new_tokens} new tokens)")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

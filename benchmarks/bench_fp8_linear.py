"""FP8 linears (`NanoFlowConfig.linear_dtype="fp8_e4m3"`), measured: the 8B shape's layer GEMMs, and the accuracy
of its teacher-forced logits.

    python3 -m benchmarks.bench_fp8_linear --out fp8_linear.json [--tokens 1056] [--layers 32]
    python3 -m benchmarks.bench_fp8_linear --device cpu --shape tiny --layers 2 --out /tmp/x.json   # smoke run

1. Time, over --tokens rows and --layers layers of distinct random weights (the Llama-3-8B layer: fused Q/K/V, O,
   gate/up, down), each row a CUDA graph of all layers replayed (median of --reps):
   - "gemm bf16": the four GEMMs per layer in bf16 (`mm`);
   - "gemm fp8 prequantised": the four as `torch._scaled_mm` (row-wise scales) on activations quantised beforehand,
     with fast accumulation (the lowering's default) and without;
   - "gemm fp8 eager quant": the same with each activation quantised by separate eager ops first;
   - "layer bf16" / "layer fp8": the layer without attention (RMSNorms, SiLU-and-multiply, residual adds and the
     GEMMs) compiled through nanoflow_fx's lowering with Inductor: bf16, and with FP8 linears (the `fp8_linears`
     pass; the activations' quantisation fused into the norms and the SiLU-and-multiply). The attention output
     feeding O is an input.
   Ratios to bf16 are printed; "fused quantisation costs" = layer fp8 - gemm fp8 prequantised - (layer bf16 - gemm
   bf16): what quantising the activations adds beyond the GEMMs, once fused.
   Also the relative error of each GEMM shape (one layer) against fp32, with and without fast accumulation.
2. Accuracy: the Llama-3-8B-shaped model (random bf16 weights, seed 0), teacher-forced through `optimize()`'s step
   on --prompts random prompts of --prompt-len tokens: its logits in bf16 against, in this order, an FP8 KV cache,
   the same weights in fp32 (bf16's own error on these weights), FP8 linears (the same weights quantised) with fast
   accumulation and without, and both FP8 options: per-token cosine similarity (mean, min), KL(reference || other)
   per token (mean, max) and top-1 agreement. (Random weights give flat logits: these figures bound the arithmetic's
   error; the trained model of tests/test_fp8_accuracy.py measures what it costs in perplexity.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import nanoflow_fx
from benchmarks.common import SHAPES, build_model
from nanoflow_fx.capture import lowering
from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.lowering import Capture, lowering_for
from nanoflow_fx.ops.fp8 import fp8_linear, quantize_rows, scaled_linear


def layer_shapes(shape: str) -> list[tuple[int, int]]:
    """(K, N) of the layer's GEMMs: fused Q/K/V, O, gate/up, down."""
    c = SHAPES[shape]
    hidden, inter = int(c["hidden_size"]), int(c["intermediate_size"])
    head = hidden // int(c["num_attention_heads"])
    qkv = (int(c["num_attention_heads"]) + 2 * int(c["num_key_value_heads"])) * head
    return [(hidden, qkv), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (fp32 statistics, result in x's dtype)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + 1e-5)).to(x.dtype)


def layer_bf16(h: torch.Tensor, attn: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor, w_qkv: torch.Tensor,
               w_o: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = F.linear(_rms(h, n1), w_qkv)
    h = h + F.linear(attn, w_o)
    gate, up = F.linear(_rms(h, n2), w_gu).chunk(2, -1)
    return h + F.linear(F.silu(gate) * up, w_d), qkv


def layer_fp8(h: torch.Tensor, attn: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor, *weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_bf16` with FP8 linears as `Fp8Linear` modules call them (the pass lowers each `fp8_linear`)."""
    w_qkv, s_qkv, w_o, s_o, w_gu, s_gu, w_d, s_d = weights
    qkv = fp8_linear(_rms(h, n1), w_qkv, s_qkv, None)
    h = h + fp8_linear(attn, w_o, s_o, None)
    gate, up = fp8_linear(_rms(h, n2), w_gu, s_gu, None).chunk(2, -1)
    return h + fp8_linear(F.silu(gate) * up, w_d, s_d, None), qkv


def timed_ms(fn: Callable[[], Any], device: str, reps: int) -> float:
    """Median ms of `fn` (on CUDA: captured once in a CUDA graph, each replay timed with events)."""
    for _ in range(3):
        fn()
    if device != "cuda":
        import time

        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compiled(fn: Callable[..., Any], linear_dtype: str) -> tuple[Callable[..., Any], list[Capture]]:
    """`fn` compiled through nanoflow_fx's lowering (Inductor on); the captures show what the passes did."""
    config = nanoflow_fx.NanoFlowConfig(linear_dtype=linear_dtype, inductor=True)
    captures: list[Capture] = []
    backend = make_backend(lowering_for(config), on_capture=captures.append)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), captures


def bench_gemms(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    dev, tokens, gen = args.device, args.tokens, torch.Generator(args.device).manual_seed(0)
    shapes = layer_shapes(args.shape)
    hidden, inter = shapes[0][0], shapes[3][0]

    def randn(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=dev) * size[-1] ** -0.5).to(dtype)

    weights = [[randn(n, k) for k, n in shapes] for _ in range(args.layers)]  # [N, K], as nn.Linear keeps them
    quantised = [[quantize_rows(w) for w in layer] for layer in weights]
    inputs = [randn(tokens, k) * k**0.5 for k, _ in shapes]  # one activation per GEMM, unit scale
    inputs_q = [quantize_rows(x) for x in inputs]
    norms = (torch.ones(hidden, device=dev, dtype=dtype), torch.ones(hidden, device=dev, dtype=dtype))
    h, attn = randn(tokens, hidden) * hidden**0.5, randn(tokens, hidden) * hidden**0.5
    assert inputs[3].shape[1] == inter
    rows: dict[str, float] = {}

    def gemm_bf16() -> None:
        for layer in weights:
            for x, w in zip(inputs, layer):
                x @ w.t()

    def gemm_fp8(fast: bool, quantise: bool) -> Callable[[], None]:
        def run() -> None:
            for layer in quantised:
                for x, xq, (w, s) in zip(inputs, inputs_q, layer):
                    q, qs = quantize_rows(x) if quantise else xq
                    scaled_linear(q, qs, w, s, None, dtype, use_fast_accum=fast)
        return run

    layer_b, _ = compiled(layer_bf16, "auto")
    layer_f, captures = compiled(layer_fp8, "fp8_e4m3")
    layer_f(h, attn, *norms, *[t for w in quantised[0] for t in w])
    assert captures and captures[0].changed("fp8_linears") == 4, "the fp8_linears pass did not lower the 4 linears"

    rows["gemm bf16"] = timed_ms(gemm_bf16, dev, args.reps)
    rows["gemm fp8 prequantised"] = timed_ms(gemm_fp8(True, False), dev, args.reps)
    rows["gemm fp8 prequantised, no fast accumulation"] = timed_ms(gemm_fp8(False, False), dev, args.reps)
    rows["gemm fp8 eager quant"] = timed_ms(gemm_fp8(True, True), dev, args.reps)
    rows["layer bf16"] = timed_ms(lambda: [layer_b(h, attn, *norms, *layer) for layer in weights], dev, args.reps)
    rows["layer fp8"] = timed_ms(lambda: [layer_f(h, attn, *norms, *[t for w in layer for t in w])
                                          for layer in quantised], dev, args.reps)
    fused_cost = rows["layer fp8"] - rows["gemm fp8 prequantised"] - (rows["layer bf16"] - rows["gemm bf16"])
    flops = 2 * tokens * sum(k * n for k, n in shapes) * args.layers
    print(f"{args.layers} layers x {tokens} tokens ({flops / 1e12:.2f} TFLOP):")
    for name, ms in rows.items():
        base = rows["layer bf16" if name.startswith("layer") else "gemm bf16"]
        print(f"  {name:<45} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  {base / ms:5.2f}x bf16")
    print(f"  fused quantisation costs {fused_cost:.3f} ms ({fused_cost / rows['layer fp8'] * 100:.1f}% of the FP8 "
          "layer)")
    errors = {}
    for (k, n), x, (xq, xs), w, (wq, ws) in zip(shapes, inputs, inputs_q, weights[0], quantised[0]):
        want = x.float() @ w.float().t()
        for fast in (True, False):
            got = scaled_linear(xq, xs, wq, ws, None, dtype, use_fast_accum=fast).float()
            errors[f"{k}x{n} fast={fast}"] = ((got - want).norm() / want.norm()).item()
        errors[f"{k}x{n} bf16"] = (((x @ w.t()).float() - want).norm() / want.norm()).item()
    print("  relative error against fp32:", {k: f"{v:.2e}" for k, v in errors.items()})
    return dict(ms=rows, fused_quantisation_ms=fused_cost, tflop=flops / 1e12, relative_error=errors)


def teacher_forced(model: Any, prompts: list[list[int]], config: dict[str, Any]) -> torch.Tensor:
    """All logits [tokens, vocab] (fp32, on the CPU) of `model` optimized with `config`, prompts packed per step."""
    nanoflow_fx.optimize(model, config)
    rows = [model.nanoflow.runner.run_prompts(prompts[i : i + 4], all_logits=True).float().cpu()
            for i in range(0, len(prompts), 4)]
    return torch.cat(rows)


def compare(want: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(want, got, dim=-1)
    kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return dict(cosine_mean=cos.mean().item(), cosine_min=cos.min().item(), kl_mean=kl.mean().item(),
                kl_max=kl.max().item(), top1_agreement=(want.argmax(-1) == got.argmax(-1)).float().mean().item())


def bench_accuracy(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """Teacher-forced logits of the FP8 configurations against the model's dtype, and that dtype's own error (its
    logits against the same weights in fp32: what any rounding moves on these weights)."""
    torch.manual_seed(0)
    model = build_model(args.shape, args.device, dtype)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    pages = 4 * -(-args.prompt_len // 16) + 8
    config: dict[str, Any] = dict(max_batch_size=8, page_size=16, num_pages=pages, cuda_graphs=False,
                                  save_step=False, max_num_tokens=4 * args.prompt_len)
    want = teacher_forced(model, prompts, config)
    results = {}

    def row(name: str, got: torch.Tensor, against: torch.Tensor = want) -> None:
        results[name] = compare(against, got)
        print(f"teacher-forced logits, {name}:", {k: round(v, 5) for k, v in results[name].items()})

    fp8_kv, base = {"kv_cache_dtype": "fp8_e4m3"}, str(dtype).removeprefix("torch.")
    row(f"FP8 KV cache vs {base}", teacher_forced(model, prompts, {**config, **fp8_kv}))
    if dtype != torch.float32:  # the model's dtype against fp32 (exact casts both ways: the weights stay the same)
        model.float()
        full = teacher_forced(model, prompts, config)
        model.to(dtype)
        row(f"{base} vs fp32", want, against=full)
    for fast in (True, False):
        lowering.FP8_FAST_ACCUM = fast  # (read by lowering_for: a lowering of its own, a key of its own)
        got = teacher_forced(model, prompts, {**config, "linear_dtype": "fp8_e4m3"})  # (quantised once, then kept)
        row(f"FP8 linears (fast accumulation {fast}) vs {base}", got)
    lowering.FP8_FAST_ACCUM = True
    row(f"FP8 KV cache + FP8 linears vs {base}",
        teacher_forced(model, prompts, {**config, **fp8_kv, "linear_dtype": "fp8_e4m3"}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=1056)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--skip", choices=["gemms", "accuracy"], action="append", default=[])
    parser.add_argument("--out", default="fp8_linear.json")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    results: dict[str, Any] = {}
    if "gemms" not in args.skip:
        results["gemms"] = bench_gemms(args, dtype)
    if "accuracy" not in args.skip:
        results["accuracy"] = bench_accuracy(args, dtype)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(date=str(datetime.date.today()), device=device, torch=torch.__version__,
                transformers=transformers.__version__, shape=args.shape, dtype=str(dtype), tokens=args.tokens,
                layers=args.layers, prompts=args.prompts, prompt_len=args.prompt_len)
    Path(args.out).write_text(json.dumps(dict(meta=meta, **results), indent=2))


if __name__ == "__main__":
    main()

"""generate() throughput on a Llama-3-8B-shaped model (random bf16 weights), HF vs nanoflow_fx, in ONE run.

    python3 -m benchmarks.bench_generate --batch-sizes 1 64 256 --prompt-len 512 --new-tokens 512

Per case: tokens/s of generate() (prompt + new tokens, new tokens counted), the mean decode step time
((t(N new) - t(1 new)) / (N - 1)), the memory floor of that step ((weights + live KV at the mean decode
context) / copy bandwidth measured in this run), % of floor, ratio to HF static cache + torch.compile, and the
time to the first generated token including optimize() (for HF compiled: its first, compiling call).
Writes JSON (--out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import nanoflow_fx
from benchmarks.common import build_model


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del x, y
    return 2 * 2 * 1024**3 / seconds


def timed_generate(model: Any, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def measure(name: str, model: Any, ids: torch.Tensor, new_tokens: int, first_call_s: float, **kw: Any) -> dict:
    t_one = timed_generate(model, ids, 1, **kw)
    t_all = timed_generate(model, ids, new_tokens, **kw)
    batch = ids.shape[0]
    row = dict(case=name, batch=batch, tokens_per_s=batch * new_tokens / t_all,
               decode_step_ms=(t_all - t_one) / (new_tokens - 1) * 1e3, first_token_s=first_call_s)
    print(f"[measured] {row}", flush=True)  # at once: a later case that crashes the process loses only itself
    return row


def run_batch(model: Any, batch: int, args: argparse.Namespace, bandwidth: float, weight_bytes: int) -> list[dict]:
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
    rows = []
    if "hf_eager" in args.cases:
        rows.append(measure("HF eager (dynamic cache)", model, ids, args.new_tokens, float("nan")))
    if "hf_compiled" in args.cases:
        # One static cache length for every call (HF sizes it from max_new_tokens otherwise, and each new size
        # recompiles); the first call compiles and must include decode steps (a 1-token call only prefills).
        static = dict(cache_implementation="static", max_cache_len=args.prompt_len + args.new_tokens)
        start = time.perf_counter()
        timed_generate(model, ids, 3, **static)
        first = time.perf_counter() - start
        rows.append(measure("HF static cache + torch.compile", model, ids, args.new_tokens, first, **static))
        torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    for backend in args.backends:
        for count in args.nanobatches:
            if count == 1:
                inductor_modes = list(args.inductor)
                if backend == "triton" and max(args.nanobatches) > 1 and "off" not in inductor_modes:
                    inductor_modes.append("off")  # the nano-batched rows' baseline: same kernels, one nano-batch
                for inductor in inductor_modes:
                    rows.append(run_nanoflow(model, ids, count, backend, "off", args, inductor == "on"))
            elif backend == "triton":  # FlashInfer plans whole steps: nano-batched steps use Triton attention
                for partition in args.partitions:
                    rows.append(run_nanoflow(model, ids, count, backend, partition, args))
    kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 128 * 2
    context = args.prompt_len + args.new_tokens / 2
    floor_ms = (weight_bytes + batch * context * kv_per_token) / bandwidth * 1e3
    hf = next((r for r in rows if r["case"].startswith("HF static")), None)
    for row in rows:
        row.update(floor_ms=floor_ms, pct_of_floor=100 * floor_ms / row["decode_step_ms"],
                   vs_hf_compiled=row["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan"))
    return rows


def run_nanoflow(model: Any, ids: torch.Tensor, count: int, backend: str, partition: str,
                 args: argparse.Namespace, inductor: bool = False) -> dict:
    config = nanoflow_fx.NanoFlowConfig(max_batch_size=ids.shape[0], max_seq_len=args.prompt_len + args.new_tokens,
                                        num_nanobatches=count, max_num_tokens=args.max_num_tokens,
                                        attention_backend=backend, inductor=inductor,
                                        experimental=nanoflow_fx.ExperimentalConfig(
                                            sm_partition=partition, memory_sms=args.memory_sms),
                                        num_pages=ids.shape[0] * -(-(args.prompt_len + args.new_tokens) // 16),
                                        fuse_linears=args.fuse_linears == "on")
    torch.cuda.synchronize()
    start = time.perf_counter()
    nanoflow_fx.optimize(model, config)
    timed_generate(model, ids, 1)
    first = time.perf_counter() - start
    runtime = model.nanoflow
    runtime.wait_until_ready()  # steps on the chosen backend, not the interim kernel (a fresh machine's first steps)
    graphs = runtime.runner.cuda_graphs is not None
    parts = [f"{count} nano-batch(es)"]
    if count > 1:
        parts.append(f"{partition} ({args.memory_sms} SMs for memory)" if partition in ("soft", "hard") else partition)
    if inductor:
        parts.append("Inductor pieces")
    parts += [f"{runtime.attention_backend.name} attention", f"CUDA graphs {graphs}"]
    row = measure("nanoflow_fx, " + ", ".join(parts), model, ids, args.new_tokens, first)
    row.update(optimize_s=runtime.capture_seconds, optimize_timings=runtime.timings, steps=dict(runtime.runner.stats),
               cuda_graphs_off_reason=runtime.runner.cuda_graphs_off_reason)
    for name in ("nanoflow", "generate", "generate_batch", "init_continuous_batching"):
        model.__dict__.pop(name, None)  # free the KV cache and graphs before the next case
    model.set_attn_implementation("sdpa")  # HF's default, for the next batch size's HF cases
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--max-num-tokens", type=int, default=4096)
    parser.add_argument("--cases", nargs="*", default=["hf_eager", "hf_compiled"])
    parser.add_argument("--nanobatches", type=int, nargs="*", default=[1])
    parser.add_argument("--backends", nargs="+", default=["auto"], help="attention backends of nanoflow_fx cases")
    parser.add_argument("--partitions", nargs="+", default=["soft", "hard"],
                        help="sm_partition of the cases with more than one nano-batch (streams, soft, hard)")
    parser.add_argument("--memory-sms", type=int, default=32, help="SMs of the memory unit's partition")
    parser.add_argument("--inductor", nargs="+", default=["off"], choices=["off", "on"],
                        help="1-nano-batch cases without and/or with Inductor-compiled pieces")
    parser.add_argument("--fuse-linears", default="on", choices=["on", "off"],
                        help="nanoflow_fx cases: Q/K/V and gate/up as one GEMM each (NanoFlowConfig.fuse_linears)")
    parser.add_argument("--out", default="bench_generate.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in args.batch_sizes:
        rows += run_batch(model, batch, args, bandwidth, weight_bytes)
        print_table(rows, bandwidth)
    meta = dict(device=torch.cuda.get_device_name(), date=str(datetime.date.today()), torch=torch.__version__,
                transformers=transformers.__version__, copy_bandwidth_TBps=bandwidth / 1e12, args=vars(args))
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


def print_table(rows: list[dict], bandwidth: float) -> None:
    print(f"\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| batch | case | tokens/s | decode step ms | floor ms | % of floor | vs HF compiled | first token s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['case']} | {r['tokens_per_s']:.0f} | {r['decode_step_ms']:.2f} | "
              f"{r.get('floor_ms', float('nan')):.2f} | {r.get('pct_of_floor', float('nan')):.0f}% | "
              f"{r.get('vs_hf_compiled', float('nan')):.2f}x | {r['first_token_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

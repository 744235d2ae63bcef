"""Decode attention bandwidth per SM partition: nanoflow_fx's Triton kernel (launch variants) against FlashInfer's
decode kernel, on Llama-3-8B's attention shape (32 query / 8 KV heads of 128, bf16, pages of 16, pages shuffled).

    python3 -m benchmarks.research.bench_attention_sms [--out attention_sms.json]

Phase 1: every Triton launch variant (block_n x num_warps x num_stages x P@V precision) on the whole GPU, for the
engine's balanced step's decodes (288 requests at context 1280); each variant's output is compared with the
default variant's. Phase 2: every variant (or the default and the --top fastest) and FlashInfer on green-context
partitions of 16/32/48 SMs and the whole GPU, for 64 @ 1024, 256 @ 1024 and 288 @ 1280. TB/s counts the KV bytes
read once. Pipeline stages matter on partitions: Triton's pipeliner gives the page-index load stages of its own,
so 3-4 stages keep one K/V tile in flight per program, 5-6 two, 7-8 three.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoflow_fx.cost.measure import time_on
from nanoflow_fx.ops.triton_attention import launch_config, paged_attention_triton
from nanoflow_fx.runtime.green_context import split_sms

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5


def make_batch(requests: int, context: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per = -(-context // PAGE)
    pages = requests * per
    cache = torch.randn(pages + 1, 2, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    i32 = dict(dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(requests, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen), cache=cache,
        qo=torch.arange(requests + 1, **i32), kvp=torch.arange(requests + 1, **i32) * per,
        idx=torch.randperm(pages, device="cuda", generator=gen).to(torch.int32),
        last=torch.full((requests,), context - (per - 1) * PAGE, **i32),
        bytes=requests * context * KV_HEADS * HEAD_DIM * 2 * 2, requests=requests, context=context)


def triton_fn(b: dict[str, Any], **launch: Any) -> Callable[[], torch.Tensor]:
    return lambda: paged_attention_triton(b["q"], b["cache"], b["qo"], b["kvp"], b["idx"], b["last"], SCALE, 0, 0.0,
                                          **launch)


def flashinfer_fn(b: dict[str, Any], workspace: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    try:
        import flashinfer
    except ImportError:
        return None
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    w.plan(b["kvp"], b["idx"], b["last"], HEADS, KV_HEADS, HEAD_DIM, PAGE, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, sm_scale=SCALE)
    return lambda: w.run(b["q"], b["cache"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="attention_sms.json")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--top", type=int, default=3, help="fastest variants taken to the partitions")
    parser.add_argument("--stages", type=int, nargs="*", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument("--precisions", nargs="*", default=["tf32"], help="P @ V precisions tried ('ieee' too)")
    parser.add_argument("--all-on-partitions", action=argparse.BooleanOptionalAction, default=True,
                        help="every variant on the partitions (their best differs from the whole GPU's)")
    args = parser.parse_args()
    import transformers
    import triton

    result: dict[str, Any] = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__,
        "default": launch_config(HEAD_DIM, torch.bfloat16), "variants": [], "partitions": []}
    whole = torch.cuda.current_stream()
    balanced = make_batch(288, 1280)
    want = triton_fn(balanced)().float()
    print("## Triton variants, 288 decodes @ 1280, whole GPU", flush=True)
    for block_n, warps, stages, pv in itertools.product(args.blocks, (4, 8), args.stages, args.precisions):
        launch = dict(block_n=block_n, num_warps=warps, num_stages=stages, pv_precision=pv)
        try:
            fn = triton_fn(balanced, **launch)
            diff = (fn().float() - want).abs().max().item()
            ms = time_on(fn, whole, args.reps)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile (shared memory) is reported
            print(f"  {launch}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        row = {**launch, "ms": round(ms, 4), "tb_s": round(balanced["bytes"] / ms / 1e9, 3),
               "max_diff_vs_default": diff}
        result["variants"].append(row)
        print(f"  {launch}: {ms:.4f} ms {row['tb_s']:.3f} TB/s (max |diff| vs default {diff:.2e})", flush=True)
    fastest = sorted(result["variants"], key=lambda r: r["ms"])[: None if args.all_on_partitions else args.top]
    picks = [dict(result["default"])] + [{k: r[k] for k in ("block_n", "num_warps", "num_stages", "pv_precision")}
                                          for r in fastest]
    picks = [dict(t) for t in dict.fromkeys(tuple(sorted(p.items())) for p in picks)]
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    sms_total = torch.cuda.get_device_properties(0).multi_processor_count
    for requests, context in ((64, 1024), (256, 1024), (288, 1280)):
        b = make_batch(requests, context)
        kernels = {f"triton {p}": triton_fn(b, **p) for p in picks}
        fi = flashinfer_fn(b, workspace)
        if fi is not None:
            kernels["flashinfer decode (tensor cores)"] = fi
        print(f"## {requests} decodes @ {context}", flush=True)
        for sms in (16, 32, 48, 0):
            stream = split_sms(sms)[0].stream if sms else whole
            for name, fn in kernels.items():
                ms = time_on(fn, stream, args.reps)
                row = {"requests": requests, "context": context, "kernel": name, "sms": sms or sms_total,
                       "ms": round(ms, 4), "tb_s": round(b["bytes"] / ms / 1e9, 3)}
                result["partitions"].append(row)
                print(f"  {row['sms']:4d} SMs {name:80s} {ms:8.4f} ms {row['tb_s']:6.3f} TB/s", flush=True)
        del b, kernels
    print("## best Triton variant per partition against FlashInfer (TB/s)", flush=True)
    summary = []
    for (requests, context, sms), rows in itertools.groupby(
            sorted(result["partitions"], key=lambda r: (r["requests"], r["context"], r["sms"])),
            key=lambda r: (r["requests"], r["context"], r["sms"])):
        rows = list(rows)
        tri = max((r for r in rows if r["kernel"].startswith("triton")), key=lambda r: r["tb_s"])
        fi = next((r["tb_s"] for r in rows if r["kernel"].startswith("flashinfer")), None)
        summary.append({"requests": requests, "context": context, "sms": sms, "triton_best": tri["kernel"],
                        "triton_tb_s": tri["tb_s"], "flashinfer_tb_s": fi})
        print(f"  {requests} @ {context} {sms:4d} SMs: {tri['tb_s']:.3f} ({tri['kernel']}) vs FlashInfer {fi}",
              flush=True)
    result["summary"] = summary
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

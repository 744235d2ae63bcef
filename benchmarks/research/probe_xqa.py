"""FlashInfer's XQA decode kernel (FlashInfer >= 0.5; on Hopper its e4m3 path multiplies on wgmma) against
nanoflow_fx's Triton kernel, over a bf16 and an e4m3 KV cache, at the engine's decode shapes (Llama-3-8B's
attention: 32 query / 8 KV heads of 128, pages of 16, shuffled). Research: nanoflow_fx runs FlashInfer 0.3.1, whose
e4m3 decode takes 0.65x the bf16 time at 256 decodes of 1024-1152 tokens (benchmarks/RESULTS.md); this measures
whether a newer FlashInfer's kernel reads e4m3 faster. Run it with that FlashInfer (and apache-tvm-ffi) first on
PYTHONPATH:

    python3 -m benchmarks.research.probe_xqa --out xqa.json [--shapes 256x1024+128 288x1280]

Per shape ("REQUESTSxCONTEXT[+SPREAD]": request i at CONTEXT + i * SPREAD // REQUESTS) and row: ms per step of
--layers calls (CUDA events), TB/s of KV read, the e4m3 row's time against the same kernel over bf16, and accuracy
against fp32 attention over the stored cache (bench_kv_dtype's `accuracy`). XQA takes a dense page table
[requests, max pages] and uint32 lengths (made once per shape here; the engine keeps CSR page lists) and one scale
pair: bmm1 = k_scale * softmax scale, bmm2 = v_scale. JSON (--out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_kv_dtype import HEAD_DIM, KV_HEADS, PAGE, SCALE, accuracy, make_batch
from nanoflow_fx.cost.measure import time_on
from nanoflow_fx.ops.backend import get


def dense_tables(b: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """XQA's page table [requests, max pages] (int32, unused entries 0), lengths (uint32) and max length."""
    kvp, last = b["host"]["kvp"].tolist(), b["host"]["last"]
    per = [kvp[i + 1] - kvp[i] for i in range(len(kvp) - 1)]
    table = torch.zeros(len(per), max(per), dtype=torch.int32, device="cuda")
    for i, n in enumerate(per):
        table[i, :n] = b["idx"][kvp[i]: kvp[i + 1]]
    lengths = (torch.tensor(per, dtype=torch.int32) - 1) * PAGE + last
    return table, lengths.cuda().view(torch.uint32), max(per) * PAGE


def rows_for(b: dict[str, Any], dtype: str, workspace: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    cache = b["caches"][dtype]
    scale = b["scales"] if dtype == "e4m3" else None
    meta = (b["qo"], b["kvp"], b["idx"], b["last"])
    triton = get("triton")
    table, lengths, max_len = dense_tables(b)
    k_scale, v_scale = (float(b["scales"][0]), float(b["scales"][1])) if dtype == "e4m3" else (1.0, 1.0)
    out: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: triton.run(b["q"], cache, *meta, SCALE, 0, 0.0, scale)}
    for name, q in (("xqa q=bf16", b["q"]), ("xqa q=fp16", b["q"].half())):
        if dtype == "bf16" and q.dtype != torch.bfloat16:
            continue
        out[name] = lambda q=q: xqa_batch_decode_with_kv_cache(
            q, cache, workspace, table, lengths, max_len, bmm1_scale=k_scale * SCALE, bmm2_scale=v_scale)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256x1024+128", "288x1280"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check", type=int, default=16, help="requests checked against the fp32 reference")
    parser.add_argument("--out", default="xqa.json")
    args = parser.parse_args()
    import flashinfer

    result: dict[str, Any] = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "flashinfer": flashinfer.__version__, "rows": []}
    workspace = torch.zeros(512 * 2**20, dtype=torch.uint8, device="cuda")  # (XQA: zeroed before first use)
    stream = torch.cuda.current_stream()
    for shape in args.shapes:
        match = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+))?", shape)
        if match is None:
            raise SystemExit(f"--shapes: {shape!r} is not REQUESTSxCONTEXT[+SPREAD]")
        requests, context, spread = int(match[1]), int(match[2]), int(match[3] or 0)
        b = make_batch(requests, context, spread=spread)
        print(f"## {requests} decodes @ {context} (+ up to {spread}), {args.layers} layers "
              f"({torch.cuda.get_device_name()}, FlashInfer {flashinfer.__version__})", flush=True)
        bf16_ms: dict[str, float] = {}
        for dtype in ("bf16", "e4m3"):
            kv_bytes = b["tokens"] * 2 * KV_HEADS * HEAD_DIM * b["caches"][dtype].element_size() * args.layers
            for name, fn in rows_for(b, dtype, workspace).items():
                try:
                    accurate = accuracy(b, dtype, fn(), args.check)
                except Exception as e:  # noqa: BLE001 - a kernel that does not build or run here is reported
                    print(f"  {dtype:5s} {name:12s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue

                def step(fn: Callable[[], torch.Tensor] = fn) -> None:
                    for _ in range(args.layers):
                        fn()

                ms = time_on(step, stream, args.reps)
                if dtype == "bf16":
                    bf16_ms[name] = ms
                base = bf16_ms.get(name, bf16_ms.get(name.replace("q=fp16", "q=bf16")))
                ratio = ms / base if dtype == "e4m3" and base else None
                row = {"shape": shape, "kernel": name, "kv_dtype": dtype, "ms": round(ms, 3),
                       "tb_s": round(kv_bytes / ms / 1e9, 3), "time_vs_bf16": round(ratio, 3) if ratio else None,
                       **accurate}
                result["rows"].append(row)
                print(f"  {dtype:5s} {name:12s} {ms:8.3f} ms {row['tb_s']:6.3f} TB/s"
                      + (f"  {ratio:.3f}x the bf16 time" if ratio else "")
                      + f"  (max rel diff vs stored {accurate['max_rel_diff_vs_stored']:.2e})", flush=True)
        del b
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

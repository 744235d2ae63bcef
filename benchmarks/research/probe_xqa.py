"""FlashInfer's XQA decode kernel (FlashInfer >= 0.5; on Hopper its e4m3 path multiplies on wgmma) against
nanoflow_fx's Triton kernel, over a bf16 and an e4m3 KV cache, at the engine's decode shapes (Llama-3-8B's
attention: 32 query / 8 KV heads of 128, pages of 16, shuffled). Research: nanoflow_fx runs FlashInfer 0.3.1, whose
e4m3 decode takes 0.65x the bf16 time at 256 decodes of 1024-1152 tokens (benchmarks/RESULTS.md); this measures
whether a newer FlashInfer's kernel reads e4m3 faster. Run it with that FlashInfer (and apache-tvm-ffi) first on
PYTHONPATH:

    python3 -m benchmarks.research.probe_xqa --out xqa.json [--shapes 256x1024+128 288x1280]

Per shape ("REQUESTSxCONTEXT[+SPREAD]": request i at CONTEXT + i * SPREAD // REQUESTS) and row: ms per step of
--layers calls (CUDA events), TB/s of KV read, the e4m3 row's time against the same kernel over bf16, and accuracy
against fp32 attention over the stored cache and over the bf16 values (bench_kv_dtype's `time_row`). XQA runs
as `fp8_attention` runs it (`nanoflow_fx.ops.xqa`: its dense page tables filled from the CSR table once per shape,
the layer's scales as host floats). JSON (--out).
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

from benchmarks.bench_kv_dtype import CONFIG, PAGE, SCALE, make_batch, time_row
from nanoflow_fx.ops import xqa
from nanoflow_fx.ops.backend import get


def rows_for(b: dict[str, Any], dtype: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Triton's decode and XQA's as `fp8_attention` runs it (`nanoflow_fx.ops.xqa`: its tables filled once here,
    the scales as host floats) over `b`'s `dtype` cache; over e4m3 with a bf16 and an fp16 query."""
    cache = b["caches"][dtype]
    scale = b["scales"] if dtype == "e4m3" else None
    meta = (b["qo"], b["kvp"], b["idx"], b["last"])
    triton = get("triton")
    kvp, last = b["host"]["kvp"], b["host"]["last"]
    tables = xqa.XqaTables(last.shape[0], int((kvp[1:] - kvp[:-1]).max()), PAGE, cache.device)
    tables.fill(kvp, last, b["idx"])
    host = (float(b["scales"][0]), float(b["scales"][1]))
    out: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: triton.run(b["q"], cache, *meta, SCALE, 0, 0.0, scale)}
    for name, q in (("xqa q=bf16", b["q"]), ("xqa q=fp16", b["q"].half())):
        if dtype == "bf16" and q.dtype != torch.bfloat16:
            continue
        out[name] = lambda q=q: xqa.run(tables, CONFIG, q, cache, scale, scale_values=lambda _: host)
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
            for name, fn in rows_for(b, dtype).items():
                try:
                    row = time_row(b, dtype, name, fn, args.layers, args.reps, args.check, bf16_ms)
                except Exception as e:  # noqa: BLE001 - a kernel that does not build or run here is reported
                    print(f"  {dtype:5s} {name:12s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                result["rows"].append({"shape": shape, **row})
        del b
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

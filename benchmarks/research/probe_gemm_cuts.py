"""What cutting a step into nano-batches costs its GEMMs, and whether cut points on tile multiples cost less.

    python3 -m benchmarks.research.probe_gemm_cuts [--tokens 1056 2048] [--out gemm_cuts.json]

One Llama-3-8B layer's GEMMs (fused Q/K/V 4096 -> 6144, O 4096 -> 4096, gate/up 4096 -> 28672, down 14336 -> 4096;
cuBLAS, bf16) over a step of T tokens, whole and cut into nano-batches: at a quarter and a half of T as the
search cuts them (`round(f * T)`), and the same cuts rounded to a multiple of 64, 128 or 256 rows. Each config
is timed as 32 layers' worth of its GEMMs back to back (median of `--reps` runs after warm-up) and reported
against the whole step: the price of splitting the step's GEMMs on one stream, the part of the price the
search's cut points can change.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # (in, out) per layer GEMM, Llama-3-8B


def cut_rows(tokens: int, fraction: float, align: int) -> tuple[int, ...]:
    cut = round(fraction * tokens)
    if align > 1:
        cut = max(align, round(cut / align) * align)
    return (cut, tokens - cut)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1056, 2048])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="gemm_cuts.json")
    args = parser.parse_args()
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for k, n in SHAPES]
    biggest = max(args.tokens)
    inputs = {k: torch.randn(biggest, k, device="cuda", dtype=torch.bfloat16) for k, _ in SHAPES}

    def layers(rows: tuple[int, ...]) -> None:
        for _ in range(32):
            for (k, _), w in zip(SHAPES, weights):
                start = 0
                for m in rows:
                    F.linear(inputs[k][start:start + m], w)
                    start += m

    def time_rows(rows: tuple[int, ...]) -> float:
        for _ in range(3):
            layers(rows)
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            layers(rows)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    out = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rows": []}
    for tokens in args.tokens:
        whole = time_rows((tokens,))
        print(f"## {tokens} tokens: whole {whole:.3f} ms (32 layers of GEMMs)", flush=True)
        out["rows"].append({"tokens": tokens, "cut": "whole", "rows": [tokens], "ms": round(whole, 3)})
        for fraction in (0.25, 0.5):
            for align in (1, 64, 128, 256):
                rows = cut_rows(tokens, fraction, align)
                ms = time_rows(rows)
                row = {"tokens": tokens, "cut": f"{fraction:g}", "align": align, "rows": list(rows),
                       "ms": round(ms, 3), "price": round(ms / whole - 1, 4)}
                out["rows"].append(row)
                print(f"  cut {fraction:g} align {align:3d}: {rows} {ms:.3f} ms ({ms / whole - 1:+.1%})", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Decode attention over a bf16 and an e4m3 (FP8) KV cache, on every GPU backend, Llama-3-8B's attention shape.

    python3 -m benchmarks.bench_kv_dtype --out kv_dtype.json [--requests 288 --context 1280 --layers 32]

The engine's steady 1024/512 step attends ~288 decodes at context ~1280 (benchmarks/RESULTS.md); its decode
attention reads every request's K and V once per layer: 128 KiB per token over 32 layers in bf16, half that in e4m3.
Each row times one step's decode attention, `--layers` kernel calls (CUDA events, `--reps` steps after warm-up),
over one layer's cache of 32 query / 8 KV heads of 128, pages of 16 shuffled (a cache of ~1.5 GB in bf16, far beyond
L2: each call reads its bytes from memory as a distinct layer's would). Kernels, as nanoflow_fx runs them:
  - triton: nanoflow_fx's Triton kernel, its default launch (64-token blocks for bf16, 128 for e4m3) and variants:
    block_n=64 and block_n=128 on both caches, and pv_precision=half (P rounded to bf16 for P @ V, V fed to the MMA
    as bf16, as FlashInfer does; the default converts V to fp32 for a tf32 MMA), heads_adjacent (a token's KV heads
    launched side by side, so a page's rows are read together) alone and with pv=half; over e4m3 also dots=fp16 (Q,
    K, V and P in fp16 for both dots, compared with the bf16 cache's default launch), with and without
    heads_adjacent; with --sweep, every launch of block_n x num_warps x num_stages x pv_precision over the e4m3
    cache too (the fastest first);
  - flashinfer: FlashInfer's decode wrapper (tensor cores for this GQA shape; an e4m3 cache with kv_data_type=e4m3,
    the scales as host floats, as the engine's cache gives them) with the bf16 query; over e4m3 also with the query
    in fp16 ("q=fp16": FlashInfer converts e4m3 to fp16 with one instruction per two values, to bf16 in software),
    as the engine runs a bf16 model over e4m3 (`kv_quant.query_dtype`; its step converts the query);
  - flashinfer-cuda-cores: its CUDA-core decode kernel (use_tensor_cores=False), scales as FlashInfer's own floats.
With `--prefill REQUESTS CHUNK PREFIX`, prefill chunks as well (causal, after PREFIX cached tokens), Triton and
FlashInfer (over e4m3 also with an fp16 query, without and with the conversions to fp16 and back); `--no-decode`
skips the decode rows.
Per row: ms per step, TB/s (KV bytes read once), and for e4m3 the ratio to the same kernel and launch over bf16;
accuracy of the first `--check` requests against fp32 attention (torch reference) over the dequantised cache (max
|diff| relative to the largest output) and over the bf16 values it was quantised from (relative RMS). JSON (--out).

The engine's offline throughput per KV dtype is bench_offline's, with the cache dtype in its config:

    python3 -m benchmarks.bench_offline --workloads 1024x512 --requests 256 --out offline_fp8kv.json \\
        --config '{"kv_cache_dtype": "fp8_e4m3"}'
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoflow_fx.cost.measure import time_on
from nanoflow_fx.ops import kv_quant
from nanoflow_fx.ops.backend import AttentionConfig, get
from nanoflow_fx.ops.reference import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
SCALE = HEAD_DIM**-0.5
CONFIG = AttentionConfig(HEADS, KV_HEADS, HEAD_DIM, SCALE, 0, 0.0)


def make_batch(requests: int, context: int, seed: int = 0, spread: int = 0) -> dict[str, Any]:
    """Decode rows of `requests` at `context` (with `spread`, request i at context + i * spread // requests, as an
    engine's running requests differ) over one layer's paged cache: the bf16 cache and its e4m3 copy (scales from
    the values' range, as calibration sets them), the tables on the device and in pinned memory."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.tensor([context + i * spread // requests for i in range(requests)], dtype=torch.int32)
    per = (lengths + PAGE - 1) // PAGE
    pages = int(per.sum())
    cache = torch.randn(pages + 1, 2, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    scales = torch.tensor([kv_quant.scale_from_amax(cache[:, i].abs().max().item()) for i in (0, 1)],
                          device="cuda")
    fp8 = torch.stack([kv_quant.quantize(cache[:, i], scales[i]) for i in (0, 1)], dim=1)
    i32: dict[str, Any] = dict(dtype=torch.int32)
    host = dict(qo=torch.arange(requests + 1, **i32), kvp=torch.cat([torch.zeros(1, **i32), per.cumsum(0).to(**i32)]),
                last=(lengths - (per - 1) * PAGE).to(**i32))
    return dict(
        q=torch.randn(requests, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen),
        caches={"bf16": cache, "e4m3": fp8}, scales=scales,
        host={k: v.pin_memory() for k, v in host.items()}, **{k: v.cuda() for k, v in host.items()},
        idx=torch.randperm(pages, device="cuda", generator=gen).to(torch.int32),
        tokens=int(lengths.sum()))


def kernels(b: dict[str, Any], dtype: str,
            keep: Callable[[str], bool] = lambda _: True) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> one decode attention call over `b`'s `dtype` cache, as nanoflow_fx runs it; those whose
    "dtype name" `keep` accepts."""
    cache = b["caches"][dtype]
    scale = b["scales"] if dtype == "e4m3" else None
    meta = (b["qo"], b["kvp"], b["idx"], b["last"])
    triton = get("triton")
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for name, launch in (("triton", {}), ("triton block_n=64", {"block_n": 64}),
                         ("triton block_n=128", {"block_n": 128}), ("triton pv=half", {"pv_precision": "half"}),
                         ("triton heads_adjacent", {"heads_adjacent": True}),
                         ("triton pv=half heads_adjacent", {"pv_precision": "half", "heads_adjacent": True})):
        if keep(f"{dtype} {name}"):
            out[name] = lambda launch=launch: triton.run(b["q"], cache, *meta, SCALE, 0, 0.0, scale, **launch)
    if dtype == "e4m3":  # (fp16 dots: for a bf16 query over an e4m3 cache only)
        for name, launch in (("triton dots=fp16", {"pv_precision": "half", "dots": "fp16"}),
                             ("triton dots=fp16 stages=2", {"pv_precision": "half", "dots": "fp16", "num_stages": 2}),
                             ("triton dots=fp16 heads_adjacent",
                              {"pv_precision": "half", "dots": "fp16", "heads_adjacent": True})):
            if keep(f"{dtype} {name}"):
                out[name] = lambda launch=launch: triton.run(b["q"], cache, *meta, SCALE, 0, 0.0, scale, **launch)
    try:
        import flashinfer
    except ImportError:
        return out
    backend = get("flashinfer")
    host = (float(b["scales"][0]), float(b["scales"][1]))  # (the engine's cache passes its host copy so)
    requests = b["host"]["last"].shape[0]

    def planned(q: torch.Tensor, graph: bool) -> Callable[[], torch.Tensor]:
        """The engine's FlashInfer decode: its planner for a query of q's dtype, eager, or as a CUDA-graph decode
        bucket plans it (fixed buffers: FlashInfer then always takes its split-KV path, the partial outputs merged
        by a kernel of its own)."""
        planner = backend.make_planner([CONFIG], PAGE, q.dtype, cache.device, decode_batch=requests if graph else None,
                                       max_pages=b["idx"].shape[0] if graph else 0, kv_dtype=cache.dtype,
                                       scale_values=(lambda _: host) if dtype == "e4m3" else None)
        plan = planner.plan_tables(b["host"]["qo"], b["host"]["kvp"], b["host"]["last"], b["idx"])
        return lambda: backend.run_planned(plan, CONFIG, q, cache, meta, None, scale)

    # (over e4m3 also the query in fp16: FlashInfer converts e4m3 to fp16 in hardware, to bf16 in software; the
    # engine runs a bf16 model's query over e4m3 in fp16, `kv_quant.query_dtype`)
    q16 = b["q"].half()
    variants = [("flashinfer", b["q"], False), ("flashinfer graph", b["q"], True)]
    if dtype == "e4m3":
        variants += [("flashinfer q=fp16", q16, False), ("flashinfer graph q=fp16", q16, True)]
    for name, q, graph in variants:
        if keep(f"{dtype} {name}"):
            out[name] = planned(q, graph)
    if keep(f"{dtype} flashinfer-cuda-cores"):
        from nanoflow_fx.ops.flashinfer_attention import _workspace

        cuda_cores = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(cache.device), "NHD",
                                                                   use_tensor_cores=False)
        cuda_cores.plan(b["kvp"], b["idx"], b["last"], HEADS, KV_HEADS, HEAD_DIM, PAGE, q_data_type=torch.bfloat16,
                        kv_data_type=cache.dtype, sm_scale=SCALE)
        floats = {"k_scale": host[0], "v_scale": host[1]} if dtype == "e4m3" else {}
        out["flashinfer-cuda-cores"] = lambda: cuda_cores.run(b["q"], cache, **floats)
    return out


def accuracy(b: dict[str, Any], dtype: str, got: torch.Tensor, rows: int) -> dict[str, float]:
    """The first `rows` requests' outputs against fp32 attention over the cache as stored (dequantised) and over
    the bf16 values (what an e4m3 cache was made from)."""
    meta = (b["qo"][: rows + 1], b["kvp"][: rows + 1], b["idx"], b["last"][:rows])
    q = b["q"][:rows].float()
    scale = b["scales"] if dtype == "e4m3" else None
    stored = paged_attention_reference(q, b["caches"][dtype], *meta, SCALE, 0, 0.0, scale)
    original = paged_attention_reference(q, b["caches"]["bf16"], *meta, SCALE, 0, 0.0)
    got = got[:rows].float()
    return {"max_rel_diff_vs_stored": ((got - stored).abs().max() / stored.abs().max()).item(),
            "rms_rel_vs_bf16_values": ((got - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt()).item()}


def time_row(b: dict[str, Any], dtype: str, name: str, fn: Callable[[], torch.Tensor], layers: int, reps: int,
             check: int, bf16_ms: dict[str, float]) -> dict[str, Any]:
    """One printed row: `fn`'s ms per step of `layers` calls over `b`'s `dtype` cache, its TB/s and accuracy
    (`accuracy`, the first `check` requests). A bf16 row's time goes into `bf16_ms`; an e4m3 row's ratio is to the
    bf16 row of its name, of its name with the query's dtype aside, else to bf16's Triton default."""
    accurate = accuracy(b, dtype, fn(), check)

    def step() -> None:
        for _ in range(layers):
            fn()

    ms = time_on(step, torch.cuda.current_stream(), reps)
    if dtype == "bf16":
        bf16_ms[name] = ms
    bases = (name, name.removesuffix(" q=fp16"), name.replace("q=fp16", "q=bf16"), "triton")
    base = next((bf16_ms[n] for n in bases if n in bf16_ms), None)
    ratio = ms / base if dtype == "e4m3" and base is not None else None
    kv_bytes = b["tokens"] * 2 * KV_HEADS * HEAD_DIM * b["caches"][dtype].element_size() * layers
    row = {"kernel": name, "kv_dtype": dtype, "ms": round(ms, 3), "tb_s": round(kv_bytes / ms / 1e9, 3),
           "time_vs_bf16": round(ratio, 3) if ratio is not None else None, **accurate}
    print(f"  {dtype:5s} {name:24s} {ms:8.3f} ms {row['tb_s']:6.3f} TB/s"
          + (f"  {ratio:.3f}x the bf16 time" if ratio is not None else "")
          + f"  (max rel diff vs stored {accurate['max_rel_diff_vs_stored']:.2e}, rms rel vs bf16 values "
            f"{accurate['rms_rel_vs_bf16_values']:.2e})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="kv_dtype.json")
    parser.add_argument("--requests", type=int, default=288)
    parser.add_argument("--context", type=int, default=1280)
    parser.add_argument("--spread", type=int, default=0, help="request i at context + i * spread // requests")
    parser.add_argument("--layers", type=int, default=32, help="kernel calls per step (one per layer)")
    parser.add_argument("--reps", type=int, default=10, help="steps timed per row")
    parser.add_argument("--check", type=int, default=16, help="requests checked against the fp32 reference")
    parser.add_argument("--sweep", action="store_true", help="also every Triton launch over the e4m3 cache")
    parser.add_argument("--prefill", type=int, nargs=3, metavar=("REQUESTS", "CHUNK", "PREFIX"), default=None,
                        help="also prefill chunks: REQUESTS requests of CHUNK new tokens after PREFIX cached ones")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    parser.add_argument("--only", default=None, help="decode rows whose 'dtype kernel' (e.g. 'e4m3 flashinfer graph "
                        "q=fp16') this regular expression matches (re.search), all by default")
    args = parser.parse_args()
    import transformers
    import triton

    try:
        from importlib.metadata import version

        flashinfer_version: str | None = version("flashinfer-python")
    except Exception:  # noqa: BLE001 - not installed
        flashinfer_version = None
    result: dict[str, Any] = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__, "flashinfer": flashinfer_version,
        "requests": args.requests, "context": args.context, "spread": args.spread, "layers": args.layers,
        "page_size": PAGE, "rows": []}
    b = make_batch(args.requests, args.context, spread=args.spread)
    print(f"## decode attention, {args.requests} decodes @ {args.context} (+ up to {args.spread}), {args.layers} "
          f"layers ({torch.cuda.get_device_name()})", flush=True)
    bf16_ms: dict[str, float] = {}
    for dtype in () if args.no_decode else ("bf16", "e4m3"):
        keep = (lambda row: re.search(args.only, row) is not None) if args.only else (lambda _: True)
        for name, fn in kernels(b, dtype, keep).items():
            result["rows"].append(time_row(b, dtype, name, fn, args.layers, args.reps, args.check, bf16_ms))
    if args.sweep:
        result["sweep"] = sweep(b, args.layers, args.reps, bf16_ms.get("triton"))
    if args.prefill:
        del b
        result["prefill"] = prefill_rows(*args.prefill, args.layers, args.reps)
    Path(args.out).write_text(json.dumps(result, indent=2))


def prefill_rows(requests: int, chunk: int, prefix: int, layers: int, reps: int) -> list[dict[str, Any]]:
    """Prefill chunks (`requests` x `chunk` new tokens, each after `prefix` cached ones, causal) as a mixed step's
    prefill rows attend, per backend and cache dtype; over e4m3 FlashInfer also with the query in fp16 (FlashInfer
    converts e4m3 to fp16 with the hardware's instruction, to bf16 in software), that row's time without and with
    the query's conversion to fp16 and the output's back to bf16 (one kernel each, as an eager step would add)."""
    b = make_batch(requests, prefix + chunk, seed=1)  # (one request's pages and table per request, as for decodes)
    per = -(-(prefix + chunk) // PAGE)
    i32: dict[str, Any] = dict(dtype=torch.int32)
    qo = torch.arange(requests + 1, **i32) * chunk
    kvp = torch.arange(requests + 1, **i32) * per
    last = torch.full((requests,), prefix + chunk - (per - 1) * PAGE, **i32)
    host = [t.pin_memory() for t in (qo, kvp, last)]
    meta = (qo.cuda(), kvp.cuda(), b["idx"], last.cuda())
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(requests * chunk, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = {dtype: paged_attention_reference(q.float(), b["caches"][dtype], *meta, SCALE, 0, 0.0,
                                             b["scales"] if dtype == "e4m3" else None) for dtype in ("bf16", "e4m3")}
    rows: list[dict[str, Any]] = []
    print(f"## prefill: {requests} x {chunk} new tokens after {prefix} cached, {layers} layers", flush=True)
    triton = get("triton")
    cases: list[tuple[str, str, Callable[[], torch.Tensor]]] = []
    for dtype in ("bf16", "e4m3"):
        cache, scale = b["caches"][dtype], (b["scales"] if dtype == "e4m3" else None)
        cases.append(("triton", dtype, lambda cache=cache, scale=scale: triton.run(q, cache, *meta, SCALE, 0, 0.0,
                                                                                    scale)))
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        flashinfer = None
    if flashinfer is not None:
        backend = get("flashinfer")
        host_scales = (float(b["scales"][0]), float(b["scales"][1]))
        q16 = q.half()
        for dtype, q_dtype in (("bf16", torch.bfloat16), ("e4m3", torch.bfloat16), ("e4m3", torch.float16)):
            cache = b["caches"][dtype]
            fp8 = dtype == "e4m3"
            planner = backend.make_planner([CONFIG], PAGE, q_dtype, cache.device, kv_dtype=cache.dtype,
                                           scale_values=(lambda _: host_scales) if fp8 else None)
            plan = planner.plan_tables(*host[:2], host[2], b["idx"])
            scale = b["scales"] if fp8 else None
            query = q16 if q_dtype == torch.float16 else q
            name = "flashinfer" + (" q=fp16" if q_dtype == torch.float16 else "")
            cases.append((name, dtype, lambda plan=plan, query=query, cache=cache, scale=scale:
                          backend.run_planned(plan, CONFIG, query, cache, meta, None, scale)))
            if q_dtype == torch.float16:
                cases.append((name + " with conversions", dtype,
                              lambda plan=plan, cache=cache, scale=scale:
                              backend.run_planned(plan, CONFIG, q.half(), cache, meta, None, scale).bfloat16()))
    base: dict[str, float] = {}
    for name, dtype, fn in cases:
        got = fn().float()
        err = ((got - want[dtype]).abs().max() / want[dtype].abs().max()).item()

        def step(fn: Callable[[], torch.Tensor] = fn) -> None:
            for _ in range(layers):
                fn()

        ms = time_on(step, torch.cuda.current_stream(), reps)
        kernel = name.split(" ")[0]
        if dtype == "bf16":
            base[kernel] = ms
        ratio = ms / base[kernel] if dtype == "e4m3" and kernel in base else None
        rows.append({"kernel": name, "kv_dtype": dtype, "ms": round(ms, 3),
                     "time_vs_bf16": round(ratio, 3) if ratio is not None else None, "max_rel_diff_vs_stored": err})
        print(f"  {dtype:5s} {name:34s} {ms:8.3f} ms" + (f"  {ratio:.3f}x the bf16 time" if ratio else "")
              + f"  (max rel diff vs stored {err:.2e})", flush=True)
    return rows


def sweep(b: dict[str, Any], layers: int, reps: int, bf16_ms: float | None) -> list[dict[str, Any]]:
    """Every Triton launch (block_n x num_warps x num_stages x pv_precision) over the e4m3 cache, fastest first."""
    triton = get("triton")
    meta = (b["qo"], b["kvp"], b["idx"], b["last"])
    rows: list[dict[str, Any]] = []
    print("## Triton launches over the e4m3 cache", flush=True)
    for block_n, warps, stages, pv in itertools.product((64, 128, 256), (4, 8), (2, 3, 4), ("tf32", "half")):
        launch = dict(block_n=block_n, num_warps=warps, num_stages=stages, pv_precision=pv)

        def step(launch: dict[str, int] = launch) -> None:
            for _ in range(layers):
                triton.run(b["q"], b["caches"]["e4m3"], *meta, SCALE, 0, 0.0, b["scales"], **launch)

        try:
            ms = time_on(step, torch.cuda.current_stream(), reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not compile (shared memory) is reported
            print(f"  {launch}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        rows.append({**launch, "ms": round(ms, 3), "time_vs_bf16": round(ms / bf16_ms, 3) if bf16_ms else None})
        print(f"  {launch}: {ms:.3f} ms" + (f" ({ms / bf16_ms:.3f}x the bf16 default)" if bf16_ms else ""),
              flush=True)
    return sorted(rows, key=lambda r: r["ms"])


if __name__ == "__main__":
    main()

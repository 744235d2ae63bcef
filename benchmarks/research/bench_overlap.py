"""Overlap on dense steps: every cut of a step (nano-batches x execution units) against the unsplit step, one process.

    python3 -m benchmarks.research.bench_overlap --out overlap.json [--trace trace.json] [--quick]

A Llama-3-8B-shaped model (random bf16 weights) is optimized with the program lowering (num_nanobatches=2:
Inductor pieces, FlashInfer planned per nano-batch). Steps (D decodes at context L + one prefill chunk of P):
  balanced 288 @ 1280 + 768 (the 1024/512 workload's steady state), 2048-token 128 @ 1024 + 1920,
  decode-only 64 and 256 @ 1024, prefill-only 2048.
First the memory unit's decode kernels: the balanced step's decode rows on each SM share with the step backend's
own kernel and the Triton variants of `cost.measure.TRITON_DECODE_VARIANTS`; the fastest per share joins the
partitioned candidates (`--no-decode-kernels`: skipped). For each step every candidate of
`nanoflow_fx.cost.model.candidates` is timed (CUDA events over steps issued back to back, as the engine issues
them, so host work hides behind the previous step where it can), and, with `--graphs` (default), also captured in
a CUDA graph and replayed (`StepHarness.time_graph`: the same GPU work without the host's cost of issuing it):
unsplit (the captured step as one nano-batch), two nano-batches on one stream (the price of splitting), on
plain streams, with attention on a green-context partition of k SMs (soft), plus the GEMMs' cuBLASLt carve-out
of the same k SMs (carveout), the GEMMs on the other SMs' green context, carved out to them (hard) or on the
persistent Triton GEMM sized to them (hard-triton), and "auto" (the search's pick, re-measured). Per row: step
ms, speedup over unsplit; for unsplit and the best cut, the kernel time by class (GEMM, attention, other) from
torch.profiler; for unsplit and the `--profile-top` fastest cuts by graph time, one graph replay profiled: kernel
time by class and the time attention kernels co-ran with the others (`StepProfile.concurrent_ms`). `--only`
restricts the cuts.
Then the memory unit alone: attention kernels' bandwidth (TB/s) on partitions of 16/32/48 SMs and the whole GPU:
FlashInfer's decode kernel with and without tensor cores, its prefill kernel over the same decode rows, and
nanoflow's Triton kernel. JSON (--out), a Markdown table on stdout, a Chrome trace of the balanced step's best
cut (--trace; Perfetto opens it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import nanoflow_fx
from benchmarks.common import SHAPES, build_model
from nanoflow_fx.cost.measure import TRITON_DECODE_VARIANTS, StepHarness, decode_kernel_timings, decode_rows, time_on
from nanoflow_fx.cost.model import (
    UNSPLIT,
    Candidate,
    StepShape,
    TunedPolicy,
    best_decode_kernels,
    candidates,
    pick,
    policy_for,
)
from nanoflow_fx.explain import profile_harness
from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.program_runner import make_units

UNEVEN = (((0.5,), (0.25, 0.5, 0.75)),)  # (dense fractions, attention fractions): NanoFlow's 8B-style 2 / 4 cut
STEPS = {
    "balanced": StepShape(288, 1280, 768),
    "2048": StepShape(128, 1024, 1920),
    "decode64": StepShape(64, 1024, 0),
    "decode256": StepShape(256, 1024, 0),
    "prefill2048": StepShape(0, 0, 2048),
}


def kernels(harness: StepHarness, policy: Any, trace: str | None = None) -> dict[str, float]:
    """Kernel time (ms) by class of one step under `policy`, from torch.profiler (overlapping kernels both count)."""
    return {k: round(v, 3) for k, v in profile_harness(harness, policy, trace).by_kind_ms().items()}


def graph_profile(harness: StepHarness, policy: Any) -> dict[str, Any]:
    """One CUDA-graph replay of the step under `policy`, profiled: kernel ms by class, the ms during which
    attention co-ran with other kernels (the overlap the units got), the busy union and the span."""
    prof = profile_harness(harness, policy, graph=True)
    return {"kinds": {k: round(v, 3) for k, v in prof.by_kind_ms().items()},
            "attention_concurrent_ms": round(prof.concurrent_ms(), 3), "busy_ms": round(prof.union_ms(), 3),
            "span_ms": round(prof.span_ms, 3)}


def policy_of(candidate: Candidate) -> Any:
    return policy_for(candidate, make_units)


def attention_bandwidth(model: Any, shape: StepShape, reps: int) -> list[dict[str, Any]]:
    """TB/s of decode attention over `shape`'s requests (layer 0's cache) on partitions of k SMs."""
    import flashinfer

    from nanoflow_fx.ops.backend import get
    from nanoflow_fx.runtime.green_context import split_sms

    runtime = model.nanoflow
    cache = runtime.kv_cache
    with decode_rows(runtime, model.config.vocab_size, shape) as rows:
        qo, kvp, idx, last = rows.metadata
        cfg, q, layer = rows.config, rows.q, rows.layer
        workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=cache.device)
        seq = ((kvp[1:] - kvp[:-1] - 1) * cache.page_size + last).to(torch.int32)
        kernels: dict[str, Any] = {}
        for tc in (True, False):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tc)
            w.plan(kvp, idx, last, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cache.page_size,
                   q_data_type=cache.dtype, kv_data_type=cache.dtype, sm_scale=cfg.scaling)
            kernels[f"flashinfer decode{' (tensor cores)' if tc else ''}"] = (lambda w=w: w.run(q, layer))
        p = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        p.plan(qo, kvp, idx, last, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim, cache.page_size, causal=True,
               q_data_type=cache.dtype, kv_data_type=cache.dtype, sm_scale=cfg.scaling, seq_lens=seq)
        kernels["flashinfer prefill kernel"] = lambda: p.run(q, layer)
        triton = get("triton")
        kernels["nanoflow triton"] = lambda: triton.run(q, layer, qo, kvp, idx, last, cfg.scaling, 0, 0.0)
        rows_out, total = [], torch.cuda.get_device_properties(0).multi_processor_count
        for sms in (16, 32, 48, 0):
            stream = split_sms(sms)[0].stream if sms else torch.cuda.current_stream()
            for name, fn in kernels.items():
                ms = time_on(fn, stream, reps)
                rows_out.append({"kernel": name, "sms": sms or total, "ms": round(ms, 4),
                                 "tb_s": round(rows.kv_bytes / ms / 1e9, 3)})
                print(f"  {name:34s} {rows_out[-1]['sms']:4d} SMs {ms:8.4f} ms {rows_out[-1]['tb_s']:6.3f} TB/s",
                      flush=True)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="*", default=list(STEPS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--modes", nargs="*", default=["streams", "soft", "carveout", "hard", "hard-triton"],
                        help="unit modes of the cuts (one stream, 'off', is always tried)")
    parser.add_argument("--quick", action="store_true", help="fewer candidates (SM shares 32 and 48 only)")
    parser.add_argument("--num-pages", type=int, default=24000)
    parser.add_argument("--out", default="overlap.json")
    parser.add_argument("--trace", default=None)
    parser.add_argument("--only", nargs="*", default=None,
                        help="replay only the candidates with these labels (and the unsplit step)")
    parser.add_argument("--profile-top", type=int, default=4,
                        help="profile one graph replay of the unsplit step and of the N fastest cuts by graph time")
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time every candidate replayed as a CUDA graph (its GPU work, no host issue cost)")
    parser.add_argument("--uneven", action=argparse.BooleanOptionalAction, default=True,
                        help="also NanoFlow's uneven cut: dense pieces in 2 nano-batches, attention calls in 4")
    parser.add_argument("--decode-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the memory unit's decode kernels per SM share and try the fastest")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, "cuda", torch.bfloat16)
    start = time.perf_counter()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(num_nanobatches=2, num_pages=args.num_pages,
                                                           max_batch_size=320, max_seq_len=4096, cuda_graphs=False))
    optimize_s = time.perf_counter() - start
    print(f"optimize: {optimize_s:.1f} s; config {model.nanoflow.config}", flush=True)
    shares = (32, 48) if args.quick else (16, 24, 32, 48)
    result: dict[str, Any] = {
        "date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "optimize_s": round(optimize_s, 1), "steps": {}}
    decode: dict[int, DecodeKernel | None] = {}
    if args.decode_kernels:  # the memory unit's decode kernel per share, measured on the balanced step's decodes
        start = time.perf_counter()
        timings = decode_kernel_timings(model.nanoflow, model.config.vocab_size, STEPS["balanced"], (*shares, 0),
                                        [DecodeKernel("triton", v) for v in TRITON_DECODE_VARIANTS], args.reps * 2)
        decode = {k: v for k, v in best_decode_kernels(timings).items() if k}
        print(f"\n## memory unit's decode kernel per SM share ({time.perf_counter() - start:.1f} s)", flush=True)
        for t in timings:
            name = t.kernel.label() if t.kernel else f"{model.nanoflow.attention_backend.name} (own)"
            print(f"  {t.sms:4d} SMs {name:50s} {t.ms:8.4f} ms {t.tb_s:6.3f} TB/s", flush=True)
        print(f"  chosen: { {k: v.label() if v else 'own' for k, v in decode.items()} }", flush=True)
        result["decode_kernels"] = [{"sms": t.sms, "kernel": t.kernel.label() if t.kernel else "own",
                                     "ms": round(t.ms, 4), "tb_s": round(t.tb_s, 3)} for t in timings]
    space = candidates(shares, modes=args.modes, decode=decode, uneven=UNEVEN if args.uneven else ())
    chosen: dict[StepShape, Candidate] = {}
    for name in args.steps:
        shape = STEPS[name]
        harness = StepHarness(model.nanoflow, shape, model.config.vocab_size)
        tried = [c for c in space if c.unsplit or (c.cuts(shape.tokens, shape.decodes)
                                                   and (args.only is None or c.label() in args.only))]
        measured: dict[Candidate, float] = {}
        host_ms: dict[Candidate, float] = {}
        search_start = time.perf_counter()
        for cand in tried:
            try:
                measured[cand] = harness.time(policy_of(cand), args.reps)
                host_ms[cand] = harness.host_ms
            except Exception as err:  # a partition the device cannot make: reported, not fatal
                print(f"  {cand.label()}: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
        search_s = time.perf_counter() - search_start
        graph_ms: dict[Candidate, float] = {}
        if args.graphs:  # the same GPU work without the host's issue cost (each step captured in a CUDA graph)
            for cand in measured:  # (each graph its own memory pool, freed after its timing: a pool handle shared
                # by graphs that are freed in turn trips an internal assert of torch's caching allocator, 2.11)
                try:
                    graph_ms[cand] = harness.time_graph(policy_of(cand), args.reps)
                except Exception as err:  # noqa: BLE001 - reported, not fatal
                    print(f"  graph of {cand.label()}: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
        best = pick(measured)
        chosen[shape] = best
        unsplit = measured[UNSPLIT]
        auto_ms = harness.time(TunedPolicy({shape: best}, make_units), args.reps)
        graph_unsplit = graph_ms.get(UNSPLIT)
        rows = sorted(({"config": c.label(), "ms": round(t, 3), "speedup": round(unsplit / t, 3),
                        "host_ms": round(host_ms[c], 2),
                        "graph_ms": round(graph_ms[c], 3) if c in graph_ms else None,
                        "graph_speedup": round(graph_unsplit / graph_ms[c], 3) if c in graph_ms and graph_unsplit
                        else None} for c, t in measured.items()), key=lambda r: r["ms"])
        fastest = min((c for c in measured if not c.unsplit), key=lambda c: measured[c], default=None)
        breakdown = {"unsplit": kernels(harness, None)}
        if fastest is not None:  # the fastest cut, even where it loses: where its time goes
            trace = args.trace if name == "balanced" else None
            breakdown[fastest.label()] = kernels(harness, policy_of(fastest), trace)
        one = min((c for c in measured if not c.unsplit and c.units == "off"), key=lambda c: measured[c], default=None)
        if one is not None and one != fastest:  # the price of splitting in GPU time: one stream, no overlap
            breakdown[one.label()] = kernels(harness, policy_of(one))
        graph_profiles: dict[str, Any] = {}
        if graph_ms and args.profile_top:  # where the GPU's time goes without the host: did the units co-run?
            for cand in sorted(graph_ms, key=lambda c: (not c.unsplit, graph_ms[c]))[: args.profile_top + 1]:
                try:
                    graph_profiles[cand.label()] = graph_profile(harness, policy_of(cand))
                except Exception as err:  # noqa: BLE001 - reported, not fatal
                    print(f"  profile of {cand.label()}: {type(err).__name__}: {str(err).splitlines()[0]}")
        one_stream = min((t for c, t in measured.items() if not c.unsplit and c.units == "off"), default=None)
        result["steps"][name] = {
            "shape": vars(shape), "unsplit_ms": round(unsplit, 3), "rows": rows,
            "split_one_stream_price": round(one_stream / unsplit - 1, 4) if one_stream else None,
            "auto": {"pick": best.label(), "ms": round(auto_ms, 3), "speedup": round(unsplit / auto_ms, 3),
                     "search_s": round(search_s, 1), "candidates": len(measured)},
            "kernels_ms": breakdown, "graph_profiles": graph_profiles}
        print(f"\n## {name}: {shape}  unsplit {unsplit:.2f} ms, auto -> {best.label()} {auto_ms:.2f} ms "
              f"({unsplit / auto_ms:.3f}x), search {search_s:.1f} s over {len(measured)} candidates", flush=True)
        print("| config | step ms | speedup | host ms | graph ms | graph speedup |\n" + "| --- " * 6 + "|")
        for row in rows[:12]:
            print(f"| {row['config']} | {row['ms']:.2f} | {row['speedup']:.3f}x | {row['host_ms']:.1f} | "
                  f"{row['graph_ms']} | {row['graph_speedup']}x |")
        if graph_ms:
            print("best by graph time (GPU work only):")
            for row in sorted((r for r in rows if r["graph_ms"]), key=lambda r: r["graph_ms"])[:8]:
                print(f"| {row['config']} | {row['ms']:.2f} | {row['speedup']:.3f}x | {row['host_ms']:.1f} | "
                      f"{row['graph_ms']} | {row['graph_speedup']}x |")
        print(f"kernels: {breakdown}", flush=True)
        if graph_profiles:
            print("one graph replay profiled | span ms | busy ms | attention co-ran ms | kernel ms by class\n"
                  "| --- | --- | --- | --- | --- |")
            for label, p in graph_profiles.items():
                print(f"| {label} | {p['span_ms']} | {p['busy_ms']} | {p['attention_concurrent_ms']} | {p['kinds']} |",
                      flush=True)
        harness.release()
        Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n## attention bandwidth per partition (288 decodes @ 1280, one layer)", flush=True)
    result["attention_bandwidth"] = attention_bandwidth(model, STEPS["balanced"], args.reps * 2)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Tensor parallelism, every row in ONE run of every rank: the all-reduce table, the TP step whole and cut in two,
engine throughput against transformers' own TP `generate_batch`.

    torchrun --nproc-per-node 8 -m benchmarks.bench_tp --model llama3-70b --out bench_tp.json
    torchrun --nproc-per-node 2 -m benchmarks.bench_tp --hf-requests 64 --out bench_tp.json          # 8B shape
    torchrun --nproc-per-node 1 -m benchmarks.bench_tp --out bench_tp.json                           # world of 1
    torchrun --nproc-per-node 2 -m benchmarks.bench_tp --device cpu --model tiny --workload 48x8 --requests 4 \\
        --hf-requests 4 --hf-cb-config '{"num_blocks": 16, "max_batch_tokens": 128}' --step-tokens 64 \
        --sizes 16384 65536 --config '{"max_num_tokens": 128}'                                            # smoke, gloo

Every rank runs it (NCCL on CUDA, gloo with `--device cpu`); rank 0 prints and writes the JSON (`--out`).
Rows, in order:
  1. all-reduce: ms per message size (`cost.measure.measure_all_reduce`: 16 KiB..32 MiB by default, the model's
     dtype, CUDA events; rank 0's times) and bus bandwidth (nccl-tests' definition);
  2. transformers' own TP `generate_batch` (`--hf-requests` of the workload's requests; 0 skips it): the model
     loaded with `from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))` from `--checkpoint`, or
     from a random checkpoint rank 0 writes first and removes after loading (`--scratch`; not for the 70B shape:
     pass a checkpoint); its weights are not row 3-4's (random either way; EOS is off, so the work is the same);
  3. nanoflow_fx's TP step (a dense prefill step of each `--step-tokens`, timed by `cost.measure.StepHarness`
     back to back): unsplit, cut into 2 nano-batches on one stream, and on two streams (CUDA); beside it the
     step's all-reduces as the measured table prices them (`cost.model.collective_ms`);
  4. nanoflow_fx's engine on the workload (`generate_batch`, requests on rank 0: the same call as row 2's).
Random weights: each rank builds only its shard (`examples/tensor_parallel.py`'s `random_shard`), bf16 on CUDA,
fp32 on the CPU; greedy, EOS off (every request generates its full output length). Ratios printed at the end:
engine over transformers, the cut steps over the unsplit one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers import GenerationConfig

import nanoflow_fx
from benchmarks.bench_offline import workload
from benchmarks.common import build_model
from examples.tensor_parallel import SHAPES, load_checkpoint, random_shard
from nanoflow_fx.capture.tensor_parallel import vocab_size
from nanoflow_fx.cost.measure import ALL_REDUCE_SIZES, StepHarness, measure_all_reduce
from nanoflow_fx.cost.model import UNSPLIT, Candidate, StepShape, all_reduce_bytes, bus_bandwidth_gbps, collective_ms
from nanoflow_fx.cost.model import policy_for as policy_of
from nanoflow_fx.runtime.program_runner import make_units

NO_EOS = -1  # (transformers' own "no EOS")


def say(*parts: Any) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def all_reduce_rows(device: torch.device, dtype: torch.dtype, sizes: list[int]) -> list[dict]:
    times = measure_all_reduce(dist.group.WORLD, device, dtype, sizes)
    world = dist.get_world_size()
    rows = [dict(bytes=size, ms=ms, bus_gbps=bus_bandwidth_gbps(size, ms, world)) for size, ms in times.items()]
    for r in rows:
        say(f"[all-reduce] {r['bytes'] / 1024:>8.0f} KiB  {r['ms'] * 1e3:9.1f} us  bus {r['bus_gbps']:7.1f} GB/s")
    return rows


def run_batch(model: Any, requests: list[tuple[list[int], int]], device: torch.device, driver_only: bool,
              **options: Any) -> dict:
    """One `generate_batch` of `requests` (all of one output length); `driver_only`: rank 0 passes the prompts and
    the others none (nanoflow_fx's contract), else every rank passes them (transformers' TP: the driver's run, the
    others' are ignored, but an empty list returns at once). `options`: more keywords of `generate_batch`."""
    new = {n for _, n in requests}
    if len(new) != 1:
        raise ValueError(f"the workload's requests have output lengths {sorted(new)}; use a PxN workload")
    (max_new,) = new
    prompts = [p for p, _ in requests] if dist.get_rank() == 0 or not driver_only else []
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=NO_EOS, pad_token_id=0)
    sync(device)
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, **options)
    sync(device)
    seconds = time.perf_counter() - start
    prompt = sum(len(p) for p, _ in requests)
    output = sum(len(r.generated_tokens) for r in results.values()) if dist.get_rank() == 0 else 0
    if dist.get_rank() == 0 and output != max_new * len(requests):
        raise RuntimeError(f"generate_batch returned {output} tokens, expected {max_new * len(requests)}")
    return dict(requests=len(requests), seconds=seconds, total_tok_s=(prompt + output) / seconds,
                output_tok_s=output / seconds)


def step_rows(model: Any, tokens: list[int], device: torch.device, all_reduce: dict[int, float]) -> list[dict]:
    """The dense TP step of each token count: unsplit, cut in two on one stream, and (CUDA) on two streams."""
    runtime = model.nanoflow
    vocab = vocab_size(model)
    tp = runtime.tensor_parallel
    reducing = sum(style in ("rowwise", "embedding_rowwise") for _, style in tp.styles) if tp is not None else 0
    itemsize = next(model.parameters()).element_size()
    cuts = [UNSPLIT, Candidate((0.5,))] + ([Candidate((0.5,), units="streams")] if device.type == "cuda" else [])
    rows = []
    for count in tokens:
        shape = StepShape(0, 0, count)
        if count > int(runtime.config.max_num_tokens):
            say(f"[step] {count} tokens exceed the step budget max_num_tokens={runtime.config.max_num_tokens} "
                f"(raise it with --config '{{\"max_num_tokens\": {count}}}'): skipped")
            continue
        if not StepHarness.fits(runtime, shape):
            say(f"[step] {count} tokens do not fit the runtime (max_num_tokens, KV pages, max_seq_len): skipped")
            continue
        predicted = reducing * collective_ms(all_reduce, all_reduce_bytes(count, model.config.hidden_size, itemsize))
        for candidate in cuts:
            ms = time_step(runtime, vocab, shape, candidate, device)
            row = dict(tokens=count, cut=candidate.label(), ms=ms, all_reduces=reducing,
                       all_reduce_ms_predicted=predicted)
            rows.append(row)
            say(f"[step] {row}")
    return rows


def time_step(runtime: Any, vocab: int, shape: StepShape, candidate: Candidate, device: torch.device,
              reps: int = 6) -> float:
    """ms per step of `shape` cut like `candidate`, steps issued back to back (CUDA: `StepHarness.time`'s CUDA
    events; CPU: the host's clock). Every rank runs the same steps."""
    policy = policy_of(candidate, make_units)
    harness = StepHarness(runtime, shape, vocab)
    try:
        sync(device)
        if device.type == "cuda":
            return harness.time(policy)
        for _ in range(2):
            runtime.runner.run(harness.chunks, split=policy)
        start = time.perf_counter()
        for _ in range(reps):
            runtime.runner.run(harness.chunks, split=policy)
        return (time.perf_counter() - start) * 1e3 / reps
    finally:
        harness.release()


def random_checkpoint(shape: str, dtype: torch.dtype, scratch: str | None) -> str:
    """Rank 0 writes a random checkpoint of `shape` (for transformers' TP loading); every rank gets its path."""
    if shape == "llama3-70b":
        raise SystemExit("--hf-requests on the 70B shape needs --checkpoint (a random 70B checkpoint is ~140 GB)")
    path = [tempfile.mkdtemp(prefix="nanoflow_tp_bench_", dir=scratch) if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        build_model(shape, "cpu", dtype).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return str(path[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default=None, choices=sorted(SHAPES), help="default: llama3-8b (CUDA), tiny (CPU)")
    parser.add_argument("--checkpoint", default=None, help="load this checkpoint (both rows) instead of random weights")
    parser.add_argument("--workload", default="1024x512", help="PxN: P prompt tokens, N new tokens per request")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=0, help="requests for transformers' generate_batch (0: no)")
    parser.add_argument("--hf-cb-config", default=None,
                        help="transformers' ContinuousBatchingConfig fields as JSON (its defaults otherwise)")
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(ALL_REDUCE_SIZES), help="all-reduce bytes")
    parser.add_argument("--config", default="{}", help="NanoFlowConfig fields as JSON (defaults otherwise)")
    parser.add_argument("--scratch", default=None, help="where rank 0 writes the random checkpoint (a temp dir)")
    parser.add_argument("--out", default="bench_tp.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run(args, device)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = args.model or ("llama3-8b" if device.type == "cuda" else "tiny")
    meta: dict[str, Any] = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                world_size=world, date=str(datetime.date.today()), torch=torch.__version__,
                                transformers=transformers.__version__, model=args.checkpoint or shape,
                                dtype=str(dtype), args=vars(args))
    say(f"[meta] {meta}")
    result: dict[str, Any] = dict(meta=meta)

    def write() -> None:
        if rank == 0:
            Path(args.out).write_text(json.dumps(result, indent=2))

    result["all_reduce"] = all_reduce_rows(device, dtype, args.sizes)
    table = {r["bytes"]: r["ms"] for r in result["all_reduce"]}
    write()
    if args.hf_requests:
        written = None if args.checkpoint else random_checkpoint(shape, dtype, args.scratch)
        hf = load_checkpoint(args.checkpoint or str(written), dtype)
        dist.barrier()
        if written is not None and rank == 0:
            shutil.rmtree(written, ignore_errors=True)  # (every rank has loaded it)
        if device.type == "cuda":
            hf.to(device)
        hf.set_attn_implementation("sdpa")
        requests = workload(args.workload, args.hf_requests, int(hf.config.vocab_size))
        options = {}
        if args.hf_cb_config:  # (transformers' defaults otherwise)
            from transformers import ContinuousBatchingConfig

            options["continuous_batching_config"] = ContinuousBatchingConfig(**json.loads(args.hf_cb_config))
        result["transformers"] = dict(case=f"transformers TP generate_batch ({args.hf_cb_config or 'defaults'})",
                                      workload=args.workload, **run_batch(hf, requests, device, False, **options))
        say(f"[measured] {result['transformers']}")
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    # (random weights: each rank builds its shard, a TP model even in a world of one, which transformers' loading
    # at tp_size=1 would leave unsharded)
    model = load_checkpoint(args.checkpoint, dtype) if args.checkpoint else random_shard(shape, args.device, dtype)
    if args.checkpoint and device.type == "cuda":
        model.to(device)
    start = time.perf_counter()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig.from_dict(json.loads(args.config)))
    model.nanoflow.wait_until_ready()
    meta.update(optimize_s=time.perf_counter() - start, config=model.nanoflow.config.to_dict())
    say(f"[optimized] {meta['optimize_s']:.1f} s")
    result["step"] = step_rows(model, args.step_tokens, device, table)
    write()
    requests = workload(args.workload, args.requests, vocab_size(model))
    result["engine"] = dict(case="nanoflow_fx engine generate_batch", workload=args.workload,
                            **run_batch(model, requests, device, driver_only=True))
    say(f"[measured] {result['engine']}")
    result["ratios"] = ratios(result)
    say(f"[ratios] {result['ratios']}")
    write()


def ratios(result: dict) -> dict[str, float]:
    """The engine over transformers (total tokens/s; their request counts may differ), each cut step over the
    unsplit one at its token count (< 1: the cut is faster)."""
    found = {}
    if "transformers" in result:
        found["engine_over_transformers"] = result["engine"]["total_tok_s"] / result["transformers"]["total_tok_s"]
    unsplit = {r["tokens"]: r["ms"] for r in result["step"] if r["cut"] == UNSPLIT.label()}
    for r in result["step"]:
        if r["cut"] != UNSPLIT.label():
            found[f"step{r['tokens']} {r['cut']} / unsplit"] = r["ms"] / unsplit[r["tokens"]]
    return found


if __name__ == "__main__":
    main()

"""Prefix caching (`NanoFlowConfig(prefix_caching=True)`) against none, on a Llama-3-8B-shaped model (random bf16
weights), every row in ONE process on one model (optimized once per setting; the second loads the saved step).

    python3 -m benchmarks.bench_prefix [--requests 256] [--conversations 64 --rounds 5] [--out bench_prefix.json]

Workloads (greedy, EOS off: every request generates exactly its output length), each through `generate_batch`:
  - none: `--requests` random 1024-token prompts, 256 new tokens each: nothing to share, caching's cost alone;
  - shared: `--requests` prompts of one 768-token system prompt + 256 unique tokens, 256 new each;
  - rounds: `--conversations` chats of `--rounds` rounds, one `generate_batch` per round; round 1's prompt is 256
    random tokens, each later round's is the previous prompt + its reply + 128 new user tokens; 128 new per round.
Settings: caching off, on, and (with --offload-gib G) on with G GiB of host memory for evicted pages. Per row:
seconds, total (prompt + generated) tokens/s, prefill tokens found in the cache (the engine's hit rate; of which
copied back from host memory) and, for rounds, the share of the reusable history (the previous rounds' prompts and
replies, whole pages) found. Each setting runs a warm-up first. Speed-ups over caching off per workload, measured in
this run; JSON (--out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

import nanoflow_fx
from benchmarks.common import build_model, print_markdown_table

NO_EOS = -1  # (transformers' own "no EOS" for generate_batch)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch(model: Any, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """One `generate_batch`: (seconds, each prompt's generated tokens)."""
    config = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=NO_EOS, pad_token_id=0)
    sync()
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config)
    sync()
    seconds = time.perf_counter() - start
    outputs = [list(r.generated_tokens) for r in results.values()]
    if len(outputs) != len(prompts) or any(len(o) != new for o in outputs):
        raise RuntimeError(f"generate_batch returned {[len(o) for o in outputs]} tokens, expected {new} each")
    return seconds, outputs


def run(model: Any, name: str, args: argparse.Namespace, gen: torch.Generator) -> dict[str, Any]:
    """One workload on the model's current engine: its row (seconds, tokens/s, the cache's hits)."""
    vocab = model.config.vocab_size
    page = model.nanoflow.kv_cache.page_size

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    stats = model.nanoflow.engine.stats
    hit0, look0, host0 = stats.prefix_hit_tokens, stats.prefix_lookup_tokens, stats.prefix_host_hit_tokens
    host = model.nanoflow.engine.host_pages
    saved0, loaded0 = (host.saved, host.loaded) if host else (0, 0)
    seconds = processed = reusable = 0.0
    if name in ("none", "shared"):
        system = tokens(768)
        prompts = [tokens(1024) if name == "none" else system + tokens(256) for _ in range(args.requests)]
        seconds, _ = batch(model, prompts, 256)
        processed = sum(len(p) + 256 for p in prompts)
    else:
        prompts = [tokens(256) for _ in range(args.conversations)]
        for r in range(args.rounds):
            s, replies = batch(model, prompts, 128)
            seconds += s
            processed += sum(len(p) + 128 for p in prompts)
            prompts = [p + reply + tokens(128) for p, reply in zip(prompts, replies)]
            if r + 1 < args.rounds:  # the next round's reusable history: this round's prompt and reply, whole pages
                reusable += sum((len(p) - 128) // page * page for p in prompts)
    hits, lookups = stats.prefix_hit_tokens - hit0, stats.prefix_lookup_tokens - look0
    row = dict(workload=name, prefix_caching=model.nanoflow.config.prefix_caching,
               offload_gib=model.nanoflow.config.prefix_offload_gib, host_pages_used=host.num_used if host else 0,
               host_hit_tokens=stats.prefix_host_hit_tokens - host0,
               host_pages_saved=host.saved - saved0 if host else 0,
               host_pages_loaded=host.loaded - loaded0 if host else 0, seconds=seconds,
               total_tok_s=processed / seconds, prefill_hit_tokens=hits, prefill_lookup_tokens=lookups,
               hit_rate=hits / max(lookups, 1), **({"reusable_hit_rate": hits / reusable} if reusable else {}))
    print(f"[measured] {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["none", "shared", "rounds"],
                        choices=["none", "shared", "rounds"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shape", default="llama3-8b", help="benchmarks.common.SHAPES (tiny: a smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of the benchmark itself)")
    parser.add_argument("--config", default="{}", help="NanoFlowConfig fields as JSON (defaults otherwise)")
    parser.add_argument("--offload-gib", type=float, default=0.0,
                        help="a third setting: caching on with this much host memory for evicted pages")
    parser.add_argument("--out", default="bench_prefix.json")
    args = parser.parse_args()
    model = build_model(args.shape, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    rows = []
    settings = [(False, 0.0), (True, 0.0)] + ([(True, args.offload_gib)] if args.offload_gib > 0 else [])
    for caching, offload in settings:
        nanoflow_fx.optimize(model, {**json.loads(args.config), "prefix_caching": caching,
                                     "prefix_offload_gib": offload})
        batch(model, [[5] * 64] * 8, 8)  # warm-up (graphs, allocator)
        for name in args.workloads:
            rows.append(run(model, name, args, torch.Generator().manual_seed(args.workloads.index(name))))
    ratios = {}
    for name in args.workloads:
        off, *on = (r for r in rows if r["workload"] == name)
        for r in on:
            ratios[f"{name}, offload {r['offload_gib']:g} GiB" if r["offload_gib"] else name] = (
                off["seconds"] / r["seconds"])
    print_markdown_table([("workload", lambda r: r["workload"]), ("caching", lambda r: str(r["prefix_caching"])),
                          ("offload GiB", lambda r: f"{r['offload_gib']:g}"),
                          ("s", lambda r: f"{r['seconds']:.2f}"), ("total tok/s", lambda r: f"{r['total_tok_s']:,.0f}"),
                          ("prefill hit rate", lambda r: f"{100 * r['hit_rate']:.1f}%"),
                          ("of reusable history", lambda r: f"{100 * r['reusable_hit_rate']:.1f}%"
                           if "reusable_hit_rate" in r else "")], rows)
    print("speed-up, caching on over off:", {k: round(v, 3) for k, v in ratios.items()})
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    meta = dict(date=str(datetime.date.today()), device=device, torch=torch.__version__,
                transformers=transformers.__version__, shape=args.shape, config=json.loads(args.config))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, speedup_on_over_off=ratios), f, indent=1)


if __name__ == "__main__":
    main()

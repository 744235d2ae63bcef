"""The OpenAI-compatible server under N concurrent streaming clients, on a Llama-3-8B-shaped model (random bf16
weights), against offline `generate_batch` on the same requests, in ONE process (the clients in others).

    python3 -m benchmarks.bench_serve --out bench_serve.json
    python3 -m benchmarks.bench_serve --clients 1 16 256 --prompt 512 --new 256 --min-requests 8
    python3 -m benchmarks.bench_serve --clients 256 --http-processes 0 1 2   # the HTTP side's processes compared

Needs the server's packages (`pip install -e ".[serve]"`) and httpx. Per concurrency level C: max(C,
`--min-requests`) streamed /v1/completions requests (prompt as token ids, greedy, `ignore_eos`: every request
generates exactly `--new` tokens) from C clients, each sending its share one after another (so at 256 clients all
256 requests run at once, as in `generate_batch`), from `--client-procs` processes of their own (so the clients'
parsing does not share the server's interpreter). The server runs as `nanoflow_fx.serve` runs it: the engine in
this process, the HTTP side in `--http-processes` processes of its own (`HTTPProcesses`; 0: uvicorn on
`make_app`, on a thread of this process), with a word-level tokenizer of the model's vocabulary (built in code: its
detokenization is what a real tokenizer's costs, roughly). Then the same requests through `model.generate_batch`
(once per level, shared by the HTTP-process counts).

Per level: wall time from the first request sent to the last token received; total (prompt + generated) and
output tokens/s; the ratio to `generate_batch`; time to first token (TTFT) and inter-token latency (ITL: the gaps
between a stream's chunks) p50 / p99, and time per output token after the first (TPOT) p50. JSON (--out) and a
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

import nanoflow_fx
from benchmarks.common import build_model, print_markdown_table
from benchmarks.serve_clients import run_clients

GREEDY_NO_EOS = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)  # -1: no EOS (transformers' own)


# ------------------------------------------------------------------------------------------------- server
@contextlib.contextmanager
def running_server(model: Any, tokenizer: Any, http_processes: int) -> Iterator[str]:
    """The server's URL while it runs: HTTP in processes of its own, or (0) on a thread of this process."""
    import uvicorn

    from nanoflow_fx.server import make_app
    from nanoflow_fx.server.launch import HTTPProcesses

    if http_processes:
        with HTTPProcesses(model, tokenizer, "llama3-8b", port=0, processes=http_processes,
                           log_level="warning") as server:
            yield server.url
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(make_app(model, tokenizer, "llama3-8b"), log_level="warning", backlog=4096))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(60)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def offline(model: Any, prompts: list[list[int]], new: int) -> float:
    _sync()
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=GREEDY_NO_EOS, max_new_tokens=new)
    _sync()
    seconds = time.perf_counter() - start
    bad = [r for r in results.values() if r.error or len(r.generated_tokens) != new]
    if len(results) != len(prompts) or bad:
        raise RuntimeError(f"generate_batch: {len(results)} results, {len(bad)} wrong")
    return seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def level(model: Any, url: str, clients: int, args: argparse.Namespace, vocab: int, http_processes: int,
          offline_s: dict[int, float]) -> dict:
    gen = torch.Generator().manual_seed(clients)
    prompts = [torch.randint(8, vocab, (args.prompt,), generator=gen).tolist()
               for _ in range(max(clients, args.min_requests))]
    per_client = [prompts[i::clients] for i in range(clients)]  # each client sends its share one after another
    procs = args.client_procs or max(1, min(16, clients // 32))
    seconds, records = run_clients(url, "llama3-8b", per_client, args.new, procs)
    errors = [r["error"] for r in records if r["error"]]
    if clients not in offline_s:  # (the same prompts for every HTTP-process count)
        offline_s[clients] = offline(model, prompts, args.new)
    total = len(prompts) * (args.prompt + args.new)
    ttft = [r["ttft"] * 1e3 for r in records if r["ttft"] is not None]
    itl = [g * 1e3 for r in records for g in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) * 1e3 / (r["tokens"] - 1) for r in records
            if r["ttft"] is not None and r["tokens"] > 1]
    row = dict(http_processes=http_processes, clients=clients, requests=len(prompts), client_procs=procs,
               prompt=args.prompt, new=args.new,
               seconds=seconds, total_tok_s=total / seconds, output_tok_s=len(prompts) * args.new / seconds,
               offline_seconds=offline_s[clients], offline_total_tok_s=total / offline_s[clients],
               server_over_offline=offline_s[clients] / seconds, ttft_ms_p50=percentile(ttft, 50),
               ttft_ms_p99=percentile(ttft, 99), itl_ms_p50=percentile(itl, 50), itl_ms_p99=percentile(itl, 99),
               tpot_ms_p50=statistics.median(tpot) if tpot else float("nan"), errors=len(errors),
               first_errors=errors[:3])
    print(f"[measured] {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--min-requests", type=int, default=8,
                        help="requests per level: one per client, at least this many (1 client: one after another)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--new", type=int, default=256, help="generated tokens per request")
    parser.add_argument("--http-processes", type=int, nargs="+", default=[2],
                        help="HTTP processes beside the engine's, one server per value (0: HTTP on a thread of the "
                        "engine's process)")
    parser.add_argument("--client-procs", type=int, default=0, help="client processes (0: one per 32 clients)")
    parser.add_argument("--config", default="{}", help="NanoFlowConfig fields as JSON (defaults otherwise)")
    parser.add_argument("--shape", default="llama3-8b", help="benchmarks.common.SHAPES (tiny: a smoke run)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run of the benchmark itself)")
    parser.add_argument("--out", default="bench_serve.json")
    args = parser.parse_args()
    from tests.tiny_models import word_tokenizer  # (a tokenizer of any vocabulary size, built in code)

    torch.manual_seed(0)
    model = build_model(args.shape, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    vocab = model.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig.from_dict(json.loads(args.config)))
    model.nanoflow.wait_until_ready()  # time the chosen attention backend, not the interim kernel
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    meta = dict(device=device, date=str(datetime.date.today()), torch=torch.__version__,
                transformers=transformers.__version__, shape=args.shape, config=model.nanoflow.config.to_dict(),
                attention=model.nanoflow.attention_backend.name, args=vars(args))
    print(f"[meta] {meta}", flush=True)
    rows: list[dict] = []
    offline_s: dict[int, float] = {}
    for http_processes in args.http_processes:
        with running_server(model, tokenizer, http_processes) as url:
            run_clients(url, "llama3-8b", [[list(range(8, 8 + args.prompt))]], 8, 1)  # warm-up: a first request
            for clients in args.clients:
                rows.append(level(model, url, clients, args, vocab, http_processes, offline_s))
                Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print_table(meta, rows)


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta['device']}, {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, "
          f"{meta['shape']}, attention {meta['attention']}")
    print_markdown_table([
        ("HTTP processes", lambda r: f"{r.get('http_processes', 0)}"), ("clients", lambda r: f"{r['clients']}"),
        ("requests", lambda r: f"{r['requests']}"),
        ("prompt / new", lambda r: f"{r['prompt']} / {r['new']}"),
        ("server total tok/s", lambda r: f"{r['total_tok_s']:,.0f}"),
        ("generate_batch total tok/s", lambda r: f"{r['offline_total_tok_s']:,.0f}"),
        ("server / offline", lambda r: f"{100 * r['server_over_offline']:.0f}%"),
        ("TTFT p50 / p99 ms", lambda r: f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f}"),
        ("ITL p50 / p99 ms", lambda r: f"{r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f}"),
        ("TPOT p50 ms", lambda r: f"{r['tpot_ms_p50']:.1f}"), ("errors", lambda r: f"{r['errors']}"),
    ], rows)

if __name__ == "__main__":
    main()

"""Streaming OpenAI-API clients for `benchmarks.bench_serve`, in processes of their own (`python3 -m
benchmarks.serve_clients`, their work as JSON on stdin, their records as JSON on stdout). Light on purpose
(asyncio, httpx, json: no torch), so the processes start at once and none shares the server's interpreter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

__all__ = ["run_clients"]


async def _one_client(http: Any, model: str, prompts: list[list[int]], new: int, records: list[dict]) -> None:
    """Send `prompts` one after another as streamed, greedy /v1/completions requests of `new` tokens each (EOS
    ignored); a record per request: time to the first text, gaps between text chunks, latency, tokens, error."""
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        chunks: list[float] = []
        tokens, error = 0, None
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = str(event["error"])
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    chunks.append(time.perf_counter())
        done = time.perf_counter()
        if error is None and tokens != new:
            error = f"{tokens} tokens generated, {new} asked"
        records.append(dict(ttft=chunks[0] - sent if chunks else None, itl=[b - a for a, b in zip(chunks, chunks[1:])],
                            latency=done - sent, tokens=tokens, error=error, end=time.time()))


def _client_process(url: str, model: str, work: list[list[list[int]]], new: int, start_at: float) -> list[dict]:
    """One process's clients (a prompt list each), all started at wall-clock time `start_at`; their records."""
    import httpx

    async def main() -> list[dict]:
        records: list[dict] = []
        limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits, trust_env=False) as http:
            late = time.time() - start_at
            if late > 0.5:
                raise RuntimeError(f"a client process started {late:.1f} s late: raise the start delay")
            await asyncio.sleep(-late)
            await asyncio.gather(*(_one_client(http, model, prompts, new, records) for prompts in work))
        return records

    return asyncio.run(main())


def run_clients(url: str, model: str, per_client: list[list[list[int]]], new: int, procs: int,
                start_delay_s: float = 5.0) -> tuple[float, list[dict]]:
    """Every client at once (a prompt list each), spread over `procs` processes; returns the seconds from the
    common start to the last token received, and every request's record."""
    shares = [share for share in (per_client[i::procs] for i in range(procs)) if share]
    start_at = time.time() + start_delay_s
    processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.serve_clients"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in shares]
    for process, share in zip(processes, shares):
        assert process.stdin is not None
        process.stdin.write(json.dumps(dict(url=url, model=model, work=share, new=new, start_at=start_at)))
        process.stdin.close()
    records = []
    for process in processes:
        assert process.stdout is not None
        out = process.stdout.read()
        if process.wait() != 0:
            raise RuntimeError(f"a client process failed (exit {process.returncode})")
        records += json.loads(out)
    return max(r["end"] for r in records) - start_at, records


if __name__ == "__main__":
    job = json.load(sys.stdin)
    print(json.dumps(_client_process(job["url"], job["model"], job["work"], job["new"], job["start_at"])))

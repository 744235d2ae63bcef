"""`HTTPProcesses`, the server as `serve` runs it: the engine in this process, the HTTP side in processes of its own
(`python -m nanoflow_fx.server.frontend`) sharing one socket. Replies equal HF's greedy `generate()` however the
streams spread over the HTTP processes; an HTTP process that dies, or an engine whose pipes close, stops the
server instead of leaving a half of it running."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

import nanoflow_fx
from nanoflow_fx.server.bridge import RemoteBackend
from nanoflow_fx.server.generation import Generations, Piece
from nanoflow_fx.server.launch import HTTPProcesses
from nanoflow_fx.server.protocol import Sampling
from tests.helpers import hf_greedy, wait_until_nothing_held
from tests.tiny_models import build, word_tokenizer

EOS = 2
CONFIG = nanoflow_fx.NanoFlowConfig(max_batch_size=4, max_seq_len=256, page_size=4, num_pages=256)


def _served(processes: int) -> HTTPProcesses:
    return HTTPProcesses(nanoflow_fx.optimize(build("llama"), CONFIG), word_tokenizer(), "tiny", port=0,
                         processes=processes, log_level="warning", start_timeout=120)


def test_streams_over_two_http_processes_each_equal_generate_and_a_dying_one_stops_the_server() -> None:
    tokenizer = word_tokenizer()
    prompts = [" ".join(f"w{(5 * i + 3 * j) % 80}" for j in range(2 + i)) for i in range(8)]
    wants = []
    for i, prompt in enumerate(prompts):  # (the references first: building a reference model seeds torch's RNG)
        ids = tokenizer(prompt)["input_ids"]
        new = hf_greedy("llama", tuple(ids), 6 + i, EOS)
        wants.append(tokenizer.decode(ids + list(new), skip_special_tokens=True)[len(prompt):])
    with _served(2) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def one(i: int) -> str:
            if i % 2:
                reply = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0)
                return reply.choices[0].text
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0,
                                               stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == wants
        with pytest.raises(openai.BadRequestError, match="maximum context length"):  # refused by the engine's side
            client.completions.create(model="tiny", prompt=" ".join(["w1"] * 300), max_tokens=4, stream=True)
        wait_until_nothing_held(server.requests.engine)  # every request ended on the engine
        server.children[0].send_signal(signal.SIGKILL)  # an HTTP process dies: the server stops, not half of it
        with pytest.raises(RuntimeError, match=f"HTTP process of the server exited \\(status {-signal.SIGKILL}\\)"):
            server.wait()
    assert all(child.poll() is not None for child in server.children)  # the other one was stopped too
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


def test_http_processes_leave_when_the_engine_side_goes() -> None:
    server = _served(1)
    try:
        assert server.bridge is not None
        server.bridge.close()  # as if the engine's process had died: the HTTP process's pipe ends
        deadline = time.monotonic() + 30
        while server.children[0].poll() is None:
            assert time.monotonic() < deadline, "the HTTP process outlived its engine"
            time.sleep(0.1)
    finally:
        server.close()


def test_a_reply_whose_last_tokens_come_before_its_acceptance_ends_as_it_should() -> None:
    # The engine's side may send a request's updates, even its last, before "accepted" (two threads send): the
    # request's limits (max tokens, EOS), which its finish reason needs, still come from "accepted".
    async def main() -> list[Piece]:
        ours, theirs = multiprocessing.Pipe()
        backend = RemoteBackend(ours)
        backend.start()
        generations = Generations(backend, word_tokenizer())
        opening = asyncio.ensure_future(generations.open([5, 6], Sampling(4, 0.0, None, None), "prompt"))
        message = await asyncio.to_thread(theirs.recv)
        assert message[0] == "add"
        theirs.send(("updates", [(message[1], 0, [7, EOS], True, None)]))
        theirs.send(("accepted", message[1], 4, EOS))
        reply = await opening
        pieces = [piece async for piece in reply.pieces()]
        reply.close()
        theirs.close()
        backend.stop()
        return pieces

    pieces = asyncio.run(main())
    assert pieces[-1].finish_reason == "stop" and pieces[-1].num_tokens == 2  # (at EOS, not "length")


def test_a_client_that_leaves_while_its_request_is_added_cancels_it_on_the_engine() -> None:
    async def main() -> tuple[Any, Any]:
        ours, theirs = multiprocessing.Pipe()
        backend = RemoteBackend(ours)
        backend.start()
        adding = asyncio.ensure_future(backend.submit([5, 6], Sampling(4, 0.0, None, None), "prompt"))
        added = await asyncio.to_thread(theirs.recv)
        adding.cancel()  # (the client disconnected before the engine's side answered)
        with pytest.raises(asyncio.CancelledError):
            await adding
        then = await asyncio.to_thread(lambda: theirs.recv() if theirs.poll(10) else None)
        theirs.close()
        backend.stop()
        return added, then

    added, then = asyncio.run(main())
    assert added[0] == "add" and then == ("cancel", added[1])

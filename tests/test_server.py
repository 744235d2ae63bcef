"""The OpenAI-compatible server, driven by the real `openai` client against a server on localhost (one for the
module): completions and chat, streamed and not, concurrent clients (each reply equal to HF's greedy `generate()`
of its prompt alone), stop strings, per-request sampling, cancellation on disconnect, and the error cases."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoflow_fx
import nanoflow_fx.server
from nanoflow_fx.server import make_app
from nanoflow_fx.server.app import _ChatFormat, _CompletionFormat, build_app
from nanoflow_fx.server.bridge import EngineBridge, RemoteBackend
from nanoflow_fx.server.generation import EngineRequests, Generations, Piece
from tests.helpers import hf_greedy, wait_until_nothing_held
from tests.tiny_models import VOCAB, build, word_tokenizer

EOS = 2
# max_batch_size 4: the concurrency test sends more requests than run at once, so some wait in the queue.
CONFIG = nanoflow_fx.NanoFlowConfig(max_batch_size=4, max_seq_len=256, page_size=4, num_pages=256)


@dataclass
class Served:
    model: Any
    tokenizer: Any
    generations: Any
    url: str

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)


@contextlib.contextmanager
def _running(model: Any, bridged: bool = False) -> Iterator[Served]:
    """`model` served as "tiny" on a free localhost port by uvicorn, on a thread of this process: on `make_app`
    (the engine behind the app), or `bridged`: the app's requests through a pipe to an `EngineBridge` on the
    engine's side, as `serve` runs them in HTTP processes of their own (here a thread, so the tests can look in)."""
    tokenizer = word_tokenizer()
    bridge = None
    if bridged:
        requests = EngineRequests(model, tokenizer.eos_token_id, "tiny")
        ours, theirs = multiprocessing.Pipe()
        bridge = EngineBridge(requests, [theirs])
        requests.start()
        bridge.start()
        app = build_app(Generations(RemoteBackend(ours), tokenizer), "tiny")
    else:
        app = make_app(model, tokenizer, "tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield Served(model, tokenizer, app.state.generations, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(30)
        if bridge is not None:
            bridge.close()
            bridge.requests.stop()


@pytest.fixture(scope="module", params=["in_process", "bridged"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    model = nanoflow_fx.optimize(build("llama"), CONFIG)  # tests.helpers.reference's weights
    with _running(model, bridged=request.param == "bridged") as served:
        yield served


def _text(served: Served, prompt: list[int], tokens: list[int] | tuple[int, ...]) -> str:
    """What the reply's text must be: the generated tokens' text as it continues the prompt's."""
    decode = served.tokenizer.decode
    return decode(list(prompt) + list(tokens), skip_special_tokens=True)[len(decode(prompt,
                                                                                   skip_special_tokens=True)):]


def _chat_ids(served: Served, messages: list[dict[str, str]]) -> list[int]:
    text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return served.tokenizer(text, add_special_tokens=False)["input_ids"]


def _idle(served: Served) -> None:
    """Wait until the engine holds nothing (no request queued or running, every page free)."""
    wait_until_nothing_held(served.model.nanoflow.engine)


def _prompt(served: Served, seed: int, length: int) -> tuple[str, list[int]]:
    words = [f"w{(seed * 7 + 3 * i) % 80}" for i in range(length)]
    text = " ".join(words)
    return text, served.tokenizer(text)["input_ids"]


def _stream_text(stream: Any, chat: bool) -> tuple[str, list[str | None], Any]:
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append((choice.delta.content or "") if chat else choice.text)
            reasons.append(choice.finish_reason)
    return "".join(pieces), reasons, usage


def test_the_public_entry_points() -> None:
    assert nanoflow_fx.serve is nanoflow_fx.server.serve  # (loaded on first use: the `serve` extra)
    with pytest.raises(TypeError, match="optimize"):
        make_app(build("llama"), word_tokenizer())


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1), model=st.sampled_from(["tiny", "a\x00b"]))
def test_a_text_event_is_the_chunk_it_stands_for(text: str, model: str) -> None:
    for fmt in (_CompletionFormat, _ChatFormat):
        out = fmt("id", model, 3)
        assert json.loads(out.text_event(text)[len("data: "):]) == out.chunk(Piece(text, 0))


def test_models_lists_the_served_model(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@pytest.mark.parametrize("as_ids", [False, True])
def test_a_completion_equals_generate(served: Served, as_ids: bool) -> None:
    text, ids = _prompt(served, 1, 6)
    reply = served.client().completions.create(model="tiny", prompt=ids if as_ids else text, max_tokens=12,
                                               temperature=0)
    want = hf_greedy("llama", tuple(ids), 12, EOS)
    choice = reply.choices[0]
    assert choice.text == _text(served, ids, want)
    assert choice.finish_reason == ("stop" if want[-1] == EOS else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(want))
    assert reply.usage.total_tokens == len(ids) + len(want)
    _idle(served)


def test_a_streamed_completion_equals_the_whole_one(served: Served) -> None:
    text, ids = _prompt(served, 2, 5)
    client = served.client()
    whole = client.completions.create(model="tiny", prompt=text, max_tokens=20, temperature=0)
    streamed, reasons, usage = _stream_text(client.completions.create(
        model="tiny", prompt=text, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}),
        chat=False)
    assert streamed == whole.choices[0].text and len(reasons) > 2
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].text == _text(served, ids, hf_greedy("llama", tuple(ids), 20, EOS))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_replies_follow_the_chat_template(served: Served, stream: bool) -> None:
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7 w8 w9"}]
    ids = _chat_ids(served, messages)
    assert ids[0] == 4 and ids[-1] == 6  # <|system|> ... <|assistant|>: the template ran
    want = hf_greedy("llama", tuple(ids), 10, EOS)
    reply = served.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                    stream=stream)
    if stream:
        text, reasons, _ = _stream_text(reply, chat=True)
        reason = reasons[-1]
    else:
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == len(want)
    assert text == _text(served, ids, want)
    assert reason == ("stop" if want[-1] == EOS else "length")


def test_concurrent_clients_each_get_generate_of_their_own_prompt(served: Served) -> None:
    # 10 requests at once on an engine that runs 4 at a time: queued, batched together, some streamed, some chat.
    client = served.client()
    requests: list[tuple[bool, Any, int, str]] = []  # chat?, prompt or messages, max_tokens, the reply wanted
    for i in range(10):  # (the references first, in this thread: building a reference model seeds torch's RNG)
        if i % 3 == 2:
            messages = [{"role": "user", "content": _prompt(served, i, 3 + i)[0]}]
            prompt, ids = messages, _chat_ids(served, messages)
        else:
            prompt, ids = _prompt(served, i, 2 + i)
        requests.append((i % 3 == 2, prompt, 6 + i, _text(served, ids, hf_greedy("llama", tuple(ids), 6 + i, EOS))))

    def one(i: int) -> str:
        chat, prompt, max_tokens, _ = requests[i]
        stream = i % 2 == 0
        if chat:
            reply = client.chat.completions.create(model="tiny", messages=prompt, max_tokens=max_tokens,
                                                   temperature=0, stream=stream)
            return _stream_text(reply, chat=True)[0] if stream else reply.choices[0].message.content
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          stream=stream)
        return _stream_text(reply, chat=False)[0] if stream else reply.choices[0].text

    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(one, range(10)))
    assert replies == [want for *_, want in requests]
    _idle(served)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_reply_before_it(served: Served, stream: bool) -> None:
    text, ids = _prompt(served, 3, 4)
    tokens = hf_greedy("llama", tuple(ids), 30, None)  # EOS off (ignore_eos): every token is known
    words = [t for t in tokens if t >= 8]  # (ids below 8 are special tokens: no text)
    stop_at = tokens.index(words[3])  # the 4th word of the reply is the stop string
    stop = served.tokenizer.convert_ids_to_tokens(words[3])
    assert stop not in _text(served, ids, tokens[:stop_at])
    kw: dict[str, Any] = dict(model="tiny", prompt=text, max_tokens=30, temperature=0, stop=[stop, "zz"],
                              extra_body={"ignore_eos": True})
    client = served.client()
    generated = served.model.nanoflow.engine.stats.generated_tokens
    if stream:
        got, reasons, usage = _stream_text(client.completions.create(**kw, stream=True,
                                                                     stream_options={"include_usage": True}),
                                           chat=False)
        reason = reasons[-1]
    else:
        reply = client.completions.create(**kw)
        got, reason, usage = reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
    assert got == _text(served, ids, tokens[:stop_at]) + " "  # the space before the stop word stays
    assert reason == "stop" and usage.completion_tokens == stop_at + 1
    _idle(served)
    # The request was cancelled on the engine at the stop string: it did not run on to max_tokens.
    assert served.model.nanoflow.engine.stats.generated_tokens - generated < 30


def test_per_request_sampling_parameters_reach_the_engine(served: Served) -> None:
    # Sampling from the top token alone (top_k=1, or top_p tiny) is greedy decoding: the same tokens as generate().
    text, ids = _prompt(served, 4, 5)
    want = _text(served, ids, hf_greedy("llama", tuple(ids), 12, None))
    client = served.client()
    for extra in ({"top_k": 1}, {}):
        reply = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=1.3,
                                          top_p=1e-6 if not extra else 1.0, extra_body={"ignore_eos": True, **extra})
        assert reply.choices[0].text == want, extra
    # Full sampling at a high temperature draws something else (the chance that 12 draws of the 96-token
    # vocabulary at temperature 2 all hit the argmax is negligible).
    reply = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=2.0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text != want and reply.usage.completion_tokens == 12


def test_a_seed_is_refused_for_sampling_and_accepted_for_greedy(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="w1", max_tokens=2, temperature=0.5, seed=3)
    assert info.value.body["param"] == "seed"
    assert client.completions.create(model="tiny", prompt="w1", max_tokens=2, temperature=0, seed=3).choices


def test_ignore_eos_generates_max_tokens(served: Served) -> None:
    reply = served.client().completions.create(model="tiny", prompt="w1 w2", max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------------------ cancellation
def test_a_streaming_client_that_disconnects_frees_its_request(served: Served) -> None:
    stats, engine = served.generations.stats, served.model.nanoflow.engine
    cancelled, finished, generated = stats.cancelled, stats.finished, engine.stats.generated_tokens
    with httpx.Client(base_url=served.url, timeout=30) as http, http.stream(
            "POST", "/v1/completions", json={"model": "tiny", "prompt": "w1 w2", "max_tokens": 250, "stream": True,
                                             "ignore_eos": True, "temperature": 0}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # the request is running
    # (the connection is closed here, long before 250 tokens)
    _idle(served)
    assert (stats.cancelled, stats.finished, stats.running) == (cancelled + 1, finished, 0)
    assert engine.stats.generated_tokens - generated < 250  # the engine stopped it: it never reached max_tokens


def test_a_waiting_client_that_gives_up_frees_its_request(served: Served) -> None:
    stats, engine = served.generations.stats, served.model.nanoflow.engine
    cancelled, finished, generated = stats.cancelled, stats.finished, engine.stats.generated_tokens
    with httpx.Client(base_url=served.url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"model": "tiny", "prompt": "w1 w2", "max_tokens": 250,
                                           "ignore_eos": True, "temperature": 0, "n": 1})
    _idle(served)
    assert (stats.cancelled, stats.finished, stats.running) == (cancelled + 1, finished, 0)
    assert engine.stats.generated_tokens - generated < 250


# ------------------------------------------------------------------------------------------------ errors
_LONG = " ".join(["w1"] * 256)


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "w1"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": _LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "w1", "max_tokens": 256}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1, VOCAB]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "w1", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "w1", "n": 2}, 400, "n", "unsupported_value"),
    ("/v1/completions", {"prompt": "w1", "frobnicate": True}, 400, "frobnicate", "unknown_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [], "stream": True}, 400, "messages", "invalid_value"),
    ("/v1/embeddings", {"input": "w1"}, 404, None, "not_found"),
])
def test_a_bad_request_gets_an_openai_error_and_the_server_runs_on(served: Served, path: str, body: Any,
                                                                   status: int, param: str | None,
                                                                   code: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error"
    reply = served.client().completions.create(model="tiny", prompt="w3", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1
    _idle(served)


def test_a_wrong_method_gets_an_openai_error(served: Served) -> None:
    response = httpx.get(f"{served.url}/v1/completions", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_a_request_that_fails_in_the_server_fails_alone(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failure while a reply is made (here: decoding any window with the word w77 raises) fails that request
    # alone, streamed (an error event) or not (a 500); the request beside it gets its reply; the engine is freed.
    decode = served.generations.decode
    poison = served.tokenizer.convert_tokens_to_ids("w77")

    def failing(ids: list[int]) -> str:
        if poison in ids:
            raise RuntimeError("decoding failed")
        return decode(ids)

    monkeypatch.setattr(served.generations, "decode", failing)
    text, ids = _prompt(served, 5, 4)
    want = _text(served, ids, hf_greedy("llama", tuple(ids), 8, EOS))
    failed = served.generations.stats.failed
    client = served.client()
    with ThreadPoolExecutor(3) as pool:
        good = pool.submit(lambda: client.completions.create(model="tiny", prompt=text, max_tokens=8, temperature=0))
        whole = pool.submit(lambda: client.completions.create(model="tiny", prompt="w1 w77", max_tokens=8))
        streamed = pool.submit(lambda: list(client.completions.create(model="tiny", prompt="w77 w2", max_tokens=8,
                                                                      stream=True)))
        assert good.result().choices[0].text == want
        with pytest.raises(openai.InternalServerError, match="decoding failed"):
            whole.result()
        with pytest.raises(openai.APIError, match="decoding failed"):
            streamed.result()
    assert served.generations.stats.failed == failed + 2
    _idle(served)


def test_the_openai_client_raises_its_own_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt=_LONG, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.with_options(base_url=f"{served.url}/v2").completions.create(model="tiny", prompt="w1")


@pytest.mark.parametrize("bridged", [False, True])
def test_an_engine_that_died_is_reported_not_hung_on(monkeypatch: pytest.MonkeyPatch, bridged: bool) -> None:
    # A step that raises ends the engine's loop: the request in it fails (500), later ones are refused (503), and
    # /health says so; no client waits forever.
    model = nanoflow_fx.optimize(build("llama"), CONFIG)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the device fell off the bus")

    monkeypatch.setattr(model.nanoflow.engine.runner, "run", broken)
    with _running(model, bridged) as served:
        client = served.client(timeout=60)
        with pytest.raises(openai.InternalServerError, match="fell off the bus"):
            client.completions.create(model="tiny", prompt="w1 w2", max_tokens=4, temperature=0)
        with pytest.raises(openai.APIStatusError, match="engine failed") as info:
            client.completions.create(model="tiny", prompt="w1 w2", max_tokens=4, temperature=0)
        assert info.value.status_code == 503 and info.value.body["code"] == "engine_dead"
        assert httpx.get(f"{served.url}/health", timeout=30).status_code == 503


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_concurrent_streams_on_cuda_equal_generate() -> None:
    # On the GPU path (Triton attention, CUDA-graph decode steps): 8 concurrent streamed replies, each equal to the
    # optimized model's own greedy generate() of its prompt alone.
    import torch

    config = dataclasses.replace(CONFIG, attention_backend="triton", cuda_graphs=True)
    model = nanoflow_fx.optimize(build("llama", device="cuda"), config)
    assert model.nanoflow.runner.cuda_graphs is not None
    tokenizer = word_tokenizer()
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 80}" for j in range(3 + 2 * i)) for i in range(8)]
    want = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=10 + i, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)
        want.append(tokenizer.decode(ids + out[0, len(ids):].tolist(), skip_special_tokens=True)[len(prompt):])
    with _running(model) as served:
        client = served.client()

        def one(i: int) -> str:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10 + i, temperature=0,
                                               stream=True)
            return _stream_text(stream, chat=False)[0]

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == want
        _idle(served)

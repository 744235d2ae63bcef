"""The OpenAI-compatible HTTP app (FastAPI): `/v1/completions`, `/v1/chat/completions` (streamed as server-sent
events or not), `/v1/models`, `/health`, on an optimized model and its tokenizer.

Every error answers with OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) and a 4xx
status for the request's fault (5xx for the server's); no request's failure stops the server or touches other
requests. A client that disconnects cancels its request on the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from nanoflow_fx.server.generation import EngineRequests, Generations, LocalBackend, Piece, Reply
from nanoflow_fx.server.protocol import APIError, ChatRequest, CompletionRequest, parse_chat, parse_completion

__all__ = ["build_app", "make_app"]

log = logging.getLogger(__name__)


def make_app(model: Any, tokenizer: Any, model_name: str | None = None) -> FastAPI:
    """The app serving `model` (optimized by `nanoflow_fx.optimize`) under `model_name` (default: the model's
    `name_or_path`), its engine in this process (the app's event loop shares the engine's interpreter:
    `nanoflow_fx.serve` puts the HTTP side in processes of its own). Requests run on the model's engine once the
    app has started (its lifespan starts the continuous-batching managers; its end waits for their requests). The
    chat endpoint needs the tokenizer's chat template."""
    requests = EngineRequests(model, tokenizer.eos_token_id, model_name)
    return build_app(Generations(LocalBackend(requests), tokenizer), requests.name)


def build_app(generations: Generations, name: str) -> FastAPI:
    """The app on `generations` (its backend: the engine here, or in another process), serving `name`."""
    tokenizer = generations.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        generations.backend.start()
        try:
            yield
        finally:
            generations.backend.stop()

    app = FastAPI(title="nanoflow_fx", lifespan=lifespan)
    app.state.generations = generations
    _add_error_handlers(app)
    created = int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "nanoflow_fx"}

    @app.get("/health")
    async def health() -> Response:
        if generations.fatal_error is not None:
            return _error(APIError(503, f"the engine failed: {generations.fatal_error}", type="server_error"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> Response:
        _check_model(model_id, name)
        return JSONResponse(card)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_completion(await _json(request))
        _check_model(body.model, name)
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt)["input_ids"]
        return await _respond(request, generations, body, prompt, name, _CompletionFormat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_chat(await _json(request))
        _check_model(body.model, name)
        return await _respond(request, generations, body, _chat_prompt(tokenizer, body), name, _ChatFormat)

    return app


# ------------------------------------------------------------------------------------------------- requests
async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                       code="invalid_json") from None


def _check_model(requested: str | None, name: str) -> None:
    if requested is not None and requested != name:
        raise APIError(404, f"The model `{requested}` does not exist: this server serves `{name}` (GET /v1/models)",
                       param="model", code="model_not_found")


def _chat_prompt(tokenizer: Any, body: ChatRequest) -> list[int]:
    """The messages through the tokenizer's chat template, as token ids (the template places BOS itself)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model's tokenizer has no chat template, so /v1/chat/completions cannot format "
                       "messages; use /v1/completions with the formatted prompt", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 (a template may raise anything for messages it refuses)
        raise APIError(400, f"messages: the chat template refused them: {err}", param="messages",
                       code="invalid_value") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def _respond(request: Request, generations: Generations, body: CompletionRequest | ChatRequest,
                   prompt: list[int], name: str, fmt: type[_Format]) -> Response:
    prompt_param = "prompt" if isinstance(body, CompletionRequest) else "messages"
    reply = await generations.open(list(prompt), body.sampling, prompt_param)
    out = fmt(f"{fmt.prefix}-{uuid.uuid4().hex}", name, len(prompt))
    if body.stream:
        return _EventStream(_events(reply, out, body.include_usage), reply.close, media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(reply))
    if not await _unless_disconnected(request, collect):
        return Response(status_code=499)  # (nobody reads it: the client left, and its request was cancelled)
    text, last = collect.result()
    return JSONResponse(out.whole(text, last))


async def _collect(reply: Reply) -> tuple[str, Piece]:
    texts, piece = [], None
    try:
        async for piece in reply.pieces():
            texts.append(piece.text)
    finally:
        reply.close()
    assert piece is not None and piece.finish_reason is not None
    return "".join(texts), piece


async def _unless_disconnected(request: Request, work: asyncio.Future[Any]) -> bool:
    """Wait for `work`; if the client disconnects first, cancel it (and so its request) and return False."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        work.result()  # (its error, if any, answers the request)
        return True
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False


async def _events(reply: Reply, out: _Format, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed reply, ending with `[DONE]`; an error after the stream started is an
    event with OpenAI's error object (the status, 200, was already sent)."""
    try:
        opening = out.opening()
        if opening is not None:
            yield _sse(opening)
        async for piece in reply.pieces():
            if piece.finish_reason is not None:
                yield _sse(out.chunk(piece))
            elif piece.text:
                yield out.text_event(piece.text)
            if piece.finish_reason is not None and include_usage:
                yield _sse(out.usage_chunk(piece))
    except APIError as err:
        yield _sse(err.body())
    except Exception as err:  # noqa: BLE001 (the server's own failure: this reply ends with it, the server runs on)
        log.error("nanoflow_fx server: a streamed reply failed", exc_info=err)
        yield _sse(APIError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                            type="server_error").body())
    finally:
        reply.close()
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A streamed reply that stops (cancelling its request) as soon as the client disconnects, whatever the ASGI
    server's spec version (Starlette's own notices it on the next write only, under ASGI 2.4). `on_close` runs
    at the end in any case (the reply's `close`: a stream never started still ends its request)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not stream.done():
                stream.cancel()
            await asyncio.gather(stream, gone, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # (`_events`: ends its request now)
            self._on_close()
        if not stream.cancelled() and stream.exception() is not None and not isinstance(stream.exception(),
                                                                                       OSError):
            raise stream.exception()  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------- replies
_HOLE = "\x00"  # where a text event's text goes (JSON escapes it: "\u0000" appears nowhere else)
class _Format:
    """One reply's OpenAI objects: a completion, or a chat completion (subclasses)."""

    prefix = ""  # of the reply's id
    chunk_object = ""  # a streamed chunk's `object`

    def __init__(self, reply_id: str, model: str, prompt_tokens: int) -> None:
        self.id, self.model, self.prompt_tokens, self.created = reply_id, model, prompt_tokens, int(time.time())
        # A stream sends an event per token, alike but for the text: built once, as any other, then filled in.
        event, hole = _sse(self.chunk(Piece(_HOLE, 0))), json.dumps(_HOLE)
        self._text_event = event.split(hole) if event.count(hole) == 1 else None  # (None: a name with the hole)

    def text_event(self, text: str) -> str:
        """The event of a chunk with (non-empty) `text` and no finish reason: `_sse(self.chunk(...))`, faster."""
        if self._text_event is None:
            return _sse(self.chunk(Piece(text, 0)))
        return json.dumps(text, ensure_ascii=False).join(self._text_event)

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, piece: Piece) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": piece.num_tokens,
                "total_tokens": self.prompt_tokens + piece.num_tokens}

    def usage_chunk(self, piece: Piece) -> dict[str, Any]:
        """The last chunk of a stream with `include_usage`: no choices, the usage."""
        return {**self.head(self.chunk_object), "choices": [], "usage": self.usage(piece)}

    def opening(self) -> dict[str, Any] | None:
        """The chunk a stream starts with, if any."""
        return None

    def chunk(self, piece: Piece) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, text: str, last: Piece) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    prefix, chunk_object = "cmpl", "text_completion"

    def chunk(self, piece: Piece) -> dict[str, Any]:
        choice = {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def whole(self, text: str, last: Piece) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return {**self.head("text_completion"), "choices": [choice], "usage": self.usage(last)}


class _ChatFormat(_Format):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def opening(self) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return {**self.head(self.chunk_object), "choices": [choice]}

    def chunk(self, piece: Piece) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"content": piece.text} if piece.text else {}, "logprobs": None,
                  "finish_reason": piece.finish_reason}
        return {**self.head(self.chunk_object), "choices": [choice]}

    def whole(self, text: str, last: Piece) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": last.finish_reason}
        return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(last)}


# -------------------------------------------------------------------------------------------------- errors
def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object: the request's (APIError, a route or method that does not exist) and
    the server's own (500, logged with its traceback; the server runs on)."""
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code))

    async def validation_error(request: Request, exc: Exception) -> Response:
        return _error(APIError(400, f"the request is not valid: {exc}"))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("nanoflow_fx server: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(APIError(500, f"the server failed on this request: {type(exc).__name__}: {exc}",
                               type="server_error"))

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        APIError: api_error, HTTPException: http_error, RequestValidationError: validation_error,
        Exception: server_error}
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)

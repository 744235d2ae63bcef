"""The server's requests on the optimized model's engine, in two halves, so the HTTP side may run in processes of
its own (`bridge`):

- `EngineRequests`, where the model is: checks a request against the model (a 400 `APIError` if it cannot run) and
  runs it through transformers' continuous-batching contract (`model.init_continuous_batching()`, nanoflow's
  manager). Two managers share the model's one engine, one greedy and one sampling (the manager takes temperature,
  top-k and top-p per request, but greedy or not from its GenerationConfig).
- `Generations`, where the HTTP app is: a request's tokens as text (`TextStream`: detokenization, stop strings),
  from a `Backend`: `LocalBackend` (the engine in this process; results come back on the asyncio loop through
  `register_result_handler`) or `bridge.RemoteBackend` (the engine in another process).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig

from nanoflow_fx.errors import InvalidInputError, KVCacheExhaustedError, RequestTooLongError
from nanoflow_fx.server.protocol import APIError, Sampling
from nanoflow_fx.server.text import TextStream

__all__ = ["Backend", "EngineRequests", "Generations", "LocalBackend", "Piece", "Plan", "Reply", "ServerStats",
           "Submitted", "engine_dead"]

log = logging.getLogger(__name__)

_GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (as vLLM's)


@dataclass
class Piece:
    """What a request produced since the last piece: new `text`, tokens generated so far (up to a stop string),
    and at the end why it stopped ("stop": EOS or a stop string; "length": `max_tokens` reached)."""

    text: str
    num_tokens: int
    finish_reason: str | None = None


@dataclass
class ServerStats:
    """Requests since the server started: still running, finished (at EOS, a stop string or max_tokens), ended
    early by their client (a disconnect), failed (in the engine or in the server)."""

    running: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Plan:
    """One request as the engine runs it."""

    prompt: list[int]
    max_new_tokens: int
    greedy: bool
    sampling: dict[str, Any]  # temperature, top_k, top_p (sampled requests)
    eos_token_id: int | list[int]


# ------------------------------------------------------------------------------------------ the engine's side
class EngineRequests:
    """The engine's side of the server: `plan` checks a request against the model, `add` runs it, `cancel` drops
    it; results are read from the managers (`managers`) by whoever added the request."""

    def __init__(self, model: Any, eos_token_id: int | list[int] | None = None, model_name: str | None = None) -> None:
        """`eos_token_id`: where the model's generation config names none (e.g. the tokenizer's); `model_name`: the
        name clients give as `model` (`name`; default: the model's `name_or_path`, else its class name)."""
        if "nanoflow" not in getattr(model, "__dict__", {}):
            raise TypeError(f"the server needs a model optimized by nanoflow_fx.optimize(), got a "
                            f"{type(model).__name__} without a runtime; call nanoflow_fx.optimize(model) first")
        self.name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
        self.model, self.engine = model, model.nanoflow.engine
        defaults = model.generation_config
        eos = defaults.eos_token_id if defaults.eos_token_id is not None else eos_token_id
        self.eos_token_id: int | list[int] = -1 if eos is None else eos  # -1: no EOS (transformers' convention)
        # A request that gives no temperature follows the model's generation config (greedy unless it samples).
        self.default_temperature = float(defaults.temperature or 1.0) if defaults.do_sample else 0.0
        self.default_top_p = float(defaults.top_p) if defaults.do_sample and defaults.top_p is not None else 1.0
        self.default_top_k = int(defaults.top_k or 0) if defaults.do_sample else 0
        base = dict(eos_token_id=self.eos_token_id, pad_token_id=defaults.pad_token_id)
        self.greedy = model.init_continuous_batching(GenerationConfig(do_sample=False, **base))
        self.sampled = model.init_continuous_batching(GenerationConfig(do_sample=True, **base))
        self.managers = (self.greedy, self.sampled)
        self.max_len = min(self.engine.config.max_seq_len,
                           self.engine.kv_cache.allocator.num_pages * self.engine.kv_cache.page_size)

    def start(self) -> None:
        for manager in self.managers:
            manager.start()

    def stop(self) -> None:
        """Stop the managers once their requests are done (the server has drained its connections by then)."""
        for manager in self.managers:
            manager.stop(block=True)

    @property
    def fatal_error(self) -> BaseException | None:
        return self.greedy.fatal_error or self.sampled.fatal_error

    def plan(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> Plan:
        """The request as the engine runs it; `APIError` if it cannot: the engine failed (503), too long a prompt
        (400, for `prompt_param`), token ids outside the vocabulary, a seed for a sampled request."""
        if self.fatal_error is not None:
            raise engine_dead(self.fatal_error)
        if len(prompt) >= self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; the prompt has "
                           f"{len(prompt)} tokens, which leaves none to generate. Shorten the prompt.",
                           param=prompt_param, code="context_length_exceeded")
        temperature = self.default_temperature if sampling.temperature is None else sampling.temperature
        greedy = temperature < _GREEDY_BELOW  # (dividing logits by less overflows them: NaN probabilities)
        if sampling.seed is not None and not greedy:
            raise APIError(400, "seed is not supported for sampled requests: the engine draws every request's "
                           "samples from one random stream, so a seed could not make a reply reproducible; leave "
                           "seed out, or set temperature=0 (greedy replies are reproducible)", param="seed",
                           code="unsupported_value")
        max_new = self.max_len - len(prompt) if sampling.max_tokens is None else sampling.max_tokens
        try:
            self.engine.check_fits(prompt, max_new, "the request")
        except (RequestTooLongError, KVCacheExhaustedError) as err:
            raise APIError(400, f"{err} (max_tokens={max_new}: lower it, or shorten the prompt)",
                           param="max_tokens", code="context_length_exceeded") from None
        except InvalidInputError as err:
            raise APIError(400, str(err), param=prompt_param, code="invalid_value") from None
        top_p = self.default_top_p if sampling.top_p is None else sampling.top_p
        top_k = self.default_top_k if sampling.top_k is None else sampling.top_k
        return Plan(prompt, max_new, greedy, {} if greedy else dict(temperature=temperature, top_p=top_p,
                                                                        top_k=top_k),
                    -1 if sampling.ignore_eos else self.eos_token_id)

    def add(self, plan: Plan, request_id: str) -> Any:
        """Queue `plan` as a streamed request `request_id`; returns its manager (`APIError` 503 if it takes none)."""
        manager = self.greedy if plan.greedy else self.sampled
        added = manager.add_request(plan.prompt, request_id=request_id, max_new_tokens=plan.max_new_tokens,
                                    streaming=True, eos_token_id=plan.eos_token_id, **plan.sampling)
        if added is None:
            if manager.fatal_error is not None:
                raise engine_dead(manager.fatal_error)
            raise APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                           code="server_shutting_down")
        return manager

    def cancel(self, request_id: str) -> None:
        """Drop the request (from either manager: the other has no request of that id). Waits for the engine's
        lock, held for a whole step: never call it on an event loop."""
        for manager in self.managers:
            manager.cancel_request(request_id)


def engine_dead(error: BaseException | str) -> APIError:
    """The 503 for a request after the engine's loop failed."""
    return APIError(503, f"the engine failed and takes no requests: {error}", type="server_error",
                    code="engine_dead")


# -------------------------------------------------------------------------------------------- the HTTP side
@dataclass
class Submitted:
    """A request on the engine as the HTTP side follows it: the tokens generated so far, whether it ended, its
    error. `changed` is set at every update (its one reader clears it); an update may stand for several steps."""

    request_id: str
    max_new_tokens: int
    eos_token_id: int | list[int]
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, start: int, tokens: Sequence[int], finished: bool, error: str | None) -> None:
        """The generated tokens from index `start` on are `tokens` (on the loop)."""
        del self.tokens[start:]
        self.tokens.extend(tokens)
        self.finished, self.error = finished or error is not None, error
        self.changed.set()


class Backend(abc.ABC):
    """Where `Generations` runs its requests (every method on the asyncio loop of the HTTP app)."""

    @property
    @abc.abstractmethod
    def fatal_error(self) -> BaseException | str | None:
        """Why the engine takes no more requests, or None while it runs."""

    @abc.abstractmethod
    async def submit(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> Submitted:
        """Check and queue a streamed request (`APIError` if it cannot run); its updates reach the `Submitted`."""

    @abc.abstractmethod
    def cancel(self, request: Submitted) -> None:
        """Drop the request on the engine (no waiting on the loop); no more updates reach it."""

    @abc.abstractmethod
    def start(self) -> None:
        """Called as the app starts (on its loop)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Called as the app ends, once its connections are drained."""


class LocalBackend(Backend):
    """The engine in this process: requests go to `EngineRequests`, updates come back on the loop through the
    managers' `register_result_handler`."""

    def __init__(self, requests: EngineRequests) -> None:
        self.requests = requests
        self._ids = itertools.count()

    @property
    def fatal_error(self) -> BaseException | None:
        return self.requests.fatal_error

    async def submit(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> Submitted:
        plan = self.requests.plan(prompt, sampling, prompt_param)
        request = Submitted(f"srv-{next(self._ids)}", plan.max_new_tokens, plan.eos_token_id)
        manager = self.requests.add(plan, request.request_id)
        def on_result(out: Any) -> None:  # (each result has every token so far: only the new ones are taken)
            seen = len(request.tokens)
            request.update(seen, out.generated_tokens[seen:], out.is_finished(),
                           None if out.error is None else str(out.error))

        manager.register_result_handler(request.request_id, on_result)
        return request

    def cancel(self, request: Submitted) -> None:
        try:  # on a worker thread: cancelling waits for the engine's lock, held for a whole step
            asyncio.get_running_loop().run_in_executor(None, self.requests.cancel, request.request_id)
        except RuntimeError:  # no running loop (the reply was collected after the loop closed)
            self.requests.cancel(request.request_id)

    def start(self) -> None:
        self.requests.start()

    def stop(self) -> None:
        self.requests.stop()


class Generations:
    """The HTTP app's requests: `open` checks and queues one on the `backend` and returns its `Reply`."""

    def __init__(self, backend: Backend, tokenizer: Any) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.stats = ServerStats()

    @property
    def fatal_error(self) -> BaseException | str | None:
        return self.backend.fatal_error

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def open(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> Reply:
        """Queue the request (`APIError` if it cannot run: nothing was queued then)."""
        request = await self.backend.submit(prompt, sampling, prompt_param)
        return Reply(self, request, TextStream(self.decode, prompt, sampling.stop))


class Reply:
    """One request's text as it comes (`pieces`). `close()` (always, once done with it) counts how it ended and
    cancels it on the engine unless it ended there: a client that left, a stop string, a failure."""

    def __init__(self, generations: Generations, request: Submitted, text: TextStream) -> None:
        self._generations, self.request, self.text = generations, request, text
        self._outcome = "cancelled"
        self._open = True
        generations.stats.running += 1

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces with text, then a last one with the finish reason; an engine failure raises `APIError` (500)."""
        request, text, seen = self.request, self.text, 0
        try:
            while True:
                await request.changed.wait()
                request.changed.clear()
                if request.error is not None:
                    raise APIError(500, f"the request failed in the engine: {request.error}", type="server_error",
                                   code="engine_error")
                tokens = request.tokens
                new = "".join(text.push(t) for t in tokens[seen:])
                seen = len(tokens)
                if text.stopped or request.finished:
                    new += text.finish()
                    self._outcome = "finished"
                    yield Piece(new, text.num_tokens, self._finish_reason())
                    return
                if new:
                    yield Piece(new, text.num_tokens)
        except Exception:
            self._outcome = "failed"
            raise

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        stats = self._generations.stats
        stats.running -= 1
        setattr(stats, self._outcome, getattr(stats, self._outcome) + 1)
        if self._outcome != "finished" or self.text.stopped:  # (a request that ended on the engine holds nothing)
            self._generations.backend.cancel(self.request)

    def _finish_reason(self) -> str:
        """"stop" at a stop string or an EOS (even as the last token allowed), else "length"."""
        request, tokens = self.request, self.request.tokens
        eos = {request.eos_token_id} if isinstance(request.eos_token_id, int) else set(request.eos_token_id)
        ended = self.text.stopped or (tokens and tokens[-1] in eos) or len(tokens) < request.max_new_tokens
        return "stop" if ended else "length"


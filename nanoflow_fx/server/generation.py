"""`Generations`: the server's requests on the optimized model's engine, as async streams of text.

Requests go through transformers' continuous-batching contract (`model.init_continuous_batching()`, nanoflow's
manager): two managers share the model's one engine, one greedy and one sampling (the manager takes temperature,
top-k and top-p per request, but greedy or not from its GenerationConfig). Results come back on the asyncio loop
(`register_result_handler`); text and stop strings are `TextStream`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

from nanoflow_fx.errors import InvalidInputError, KVCacheExhaustedError, RequestTooLongError
from nanoflow_fx.server.protocol import APIError, Sampling
from nanoflow_fx.server.text import TextStream

__all__ = ["Generations", "Piece", "ServerStats"]

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
class _Plan:
    """One request as the engine runs it."""

    prompt: list[int]
    max_new_tokens: int
    greedy: bool
    sampling: dict[str, Any]  # temperature, top_k, top_p (sampled requests)
    eos_token_id: int | list[int]
    stop: tuple[str, ...]


class Generations:
    """The server's bridge to the engine: `prepare` checks a request against the model (a 400 `APIError` if it
    cannot run), `stream` runs it and yields `Piece`s on the caller's asyncio loop. A request whose consumer stops
    (a client that left, a stop string) is cancelled on the engine at once, freeing its KV pages."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = model.nanoflow.engine
        defaults = model.generation_config
        eos = defaults.eos_token_id if defaults.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id: int | list[int] = -1 if eos is None else eos  # -1: no EOS (transformers' convention)
        # A request that gives no temperature follows the model's generation config (greedy unless it samples).
        self.default_temperature = float(defaults.temperature or 1.0) if defaults.do_sample else 0.0
        self.default_top_p = float(defaults.top_p) if defaults.do_sample and defaults.top_p is not None else 1.0
        self.default_top_k = int(defaults.top_k or 0) if defaults.do_sample else 0
        base = dict(eos_token_id=self.eos_token_id, pad_token_id=defaults.pad_token_id)
        self._greedy = model.init_continuous_batching(GenerationConfig(do_sample=False, **base))
        self._sampled = model.init_continuous_batching(GenerationConfig(do_sample=True, **base))
        self._ids = itertools.count()
        self.stats = ServerStats()
        self.max_len = min(self.engine.config.max_seq_len,
                           self.engine.kv_cache.allocator.num_pages * self.engine.kv_cache.page_size)

    def start(self) -> None:
        self._greedy.start()
        self._sampled.start()

    def stop(self) -> None:
        """Stop the managers once their requests are done (the server has drained its connections by then)."""
        self._greedy.stop(block=True)
        self._sampled.stop(block=True)

    @property
    def fatal_error(self) -> BaseException | None:
        return self._greedy.fatal_error or self._sampled.fatal_error

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def prepare(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> _Plan:
        """The request as the engine runs it; `APIError` (400) if it cannot: too long a prompt (for
        `prompt_param`), token ids outside the vocabulary, a seed for a sampled request."""
        if self.fatal_error is not None:
            raise APIError(503, f"the engine failed and takes no requests: {self.fatal_error}", type="server_error",
                           code="engine_dead")
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
        return _Plan(prompt, max_new, greedy, {} if greedy else dict(temperature=temperature, top_p=top_p,
                                                                         top_k=top_k),
                     -1 if sampling.ignore_eos else self.eos_token_id, sampling.stop)

    async def stream(self, plan: _Plan) -> AsyncIterator[Piece]:
        """Run `plan` on the engine: its text as it comes (pieces with text, then a last one with the finish
        reason). An engine failure raises `APIError` (500). Leaving the iteration early (a client that left)
        cancels the request on the engine."""
        manager = self._greedy if plan.greedy else self._sampled
        request_id = f"srv-{next(self._ids)}"
        results: asyncio.Queue[Any] = asyncio.Queue()
        added = manager.add_request(plan.prompt, request_id=request_id, max_new_tokens=plan.max_new_tokens,
                                    streaming=True, eos_token_id=plan.eos_token_id, **plan.sampling)
        if added is None:
            if manager.fatal_error is not None:
                raise APIError(503, f"the engine failed and takes no requests: {manager.fatal_error}",
                               type="server_error", code="engine_dead")
            raise APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                           code="server_shutting_down")
        manager.register_result_handler(request_id, results.put_nowait)
        text = TextStream(self.decode, plan.prompt, plan.stop)
        self.stats.running += 1
        outcome = "cancelled"
        try:
            async for piece in self._pieces(results, text, plan):
                if piece.finish_reason is not None:
                    outcome = "finished"
                yield piece
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.stats.running -= 1
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            if outcome != "finished" or text.stopped:  # (a request that ended on the engine has nothing to free)
                self._cancel(manager, request_id)

    async def _pieces(self, results: asyncio.Queue[Any], text: TextStream, plan: _Plan) -> AsyncIterator[Piece]:
        seen = 0
        while True:
            output = await results.get()
            while not results.empty():  # each update extends the one before: the latest has every token
                output = results.get_nowait()
            if output.error is not None:
                raise APIError(500, f"the request failed in the engine: {output.error}", type="server_error",
                               code="engine_error")
            tokens = output.generated_tokens
            new = "".join(text.push(t) for t in tokens[seen:])
            seen = len(tokens)
            if text.stopped or output.is_finished():
                new += text.finish()
                yield Piece(new, text.num_tokens, self._finish_reason(text, tokens, plan))
                return
            if new:
                yield Piece(new, text.num_tokens)

    @staticmethod
    def _finish_reason(text: TextStream, tokens: Sequence[int], plan: _Plan) -> str:
        """"stop" at a stop string or an EOS (even as the last token allowed), else "length"."""
        eos = {plan.eos_token_id} if isinstance(plan.eos_token_id, int) else set(plan.eos_token_id)
        ended = text.stopped or (tokens and tokens[-1] in eos) or len(tokens) < plan.max_new_tokens
        return "stop" if ended else "length"

    @staticmethod
    def _cancel(manager: Any, request_id: str) -> None:
        """Cancel on a worker thread: the manager takes the engine's lock, held for a whole step, and the event loop
        must not wait for it."""
        try:
            asyncio.get_running_loop().run_in_executor(None, manager.cancel_request, request_id)
        except RuntimeError:  # no running loop (the stream was collected after the loop closed)
            manager.cancel_request(request_id)

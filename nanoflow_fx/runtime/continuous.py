"""transformers' continuous-batching contract on nanoflow's engine: `generate_batch` and a streaming manager.

`model.generate_batch(inputs, generation_config=None, ...)` and `model.init_continuous_batching(...)` take
transformers' arguments and return its types (`GenerationOutput` per request id, `RequestStatus`), so code
written for transformers' continuous batching runs unchanged; the requests run on the optimized model's one
engine (`runtime.engine.Engine`), with its dense steps, paged KV cache and CUDA graphs. Per request:
`max_new_tokens`, `eos_token_id` and the sampling keywords `temperature`, `top_k`, `top_p`. From the
GenerationConfig also `do_sample`, `min_new_tokens` / `min_length`, `max_length`, `suppress_tokens` (a logits
mask, as HF's processor) and `num_return_sequences` (n - 1 more requests per prompt, with transformers' ids
`{id}__child#{i}`). Any other option set to a non-default value is refused by name (`generate()`'s list of the
options its fast path implements, `runtime.generate`): transformers' continuous batching drops some of them
with a warning and runs others wrongly, and nanoflow never ignores an option silently.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import numbers
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.continuous_batching.requests import GenerationOutput

from nanoflow_fx.errors import InvalidInputError, NanoFlowError, RequestTooLongError
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.generate import _max_new_tokens, _unsupported_options
from nanoflow_fx.runtime.requests import FAILED, FINISHED, PENDING, RUNNING, Request
from nanoflow_fx.runtime.sampling import SamplingParams, sampling_value

__all__ = ["ContinuousBatchingManager", "generate_batch", "to_output"]

log = logging.getLogger(__name__)

# The per-request sampling keywords, and what an unset one means (transformers' continuous batching builds its
# processors from the config as given: an unset top_k adds no top-k warper).
_UNSET = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
# Options the manager implements beyond generate()'s fast path (or that configure what it has nothing to set).
_ALSO_HANDLED = ("suppress_tokens", "num_return_sequences", "continuous_batching_config")


def to_output(req: Request) -> GenerationOutput:
    """A request as transformers reports it (only tokens already read back from the device)."""
    if req.state == FAILED:
        status = RequestStatus.FAILED
    elif req.state == FINISHED:
        status = RequestStatus.FINISHED
    elif req.state == RUNNING:
        status = RequestStatus.DECODING if req.num_cached >= len(req.prompt) else RequestStatus.PREFILLING
    else:
        status = RequestStatus.PENDING
    tokens = [t for t in req.output if t != PENDING]
    return GenerationOutput(request_id=req.request_id, prompt_ids=list(req.prompt), generated_tokens=tokens,
                            error=req.error, status=status, created_time=req.created_time,
                            lifespan=(req.first_scheduled_time, req.finished_time),
                            timestamps=list(req.timestamps) if req.timestamps is not None else None)


def _check_options(gen: GenerationConfig) -> None:
    """Raise `InvalidInputError` naming the first option of `gen` set to a value the engine does not implement."""
    option = _unsupported_options(gen, _ALSO_HANDLED)
    if option is not None:
        raise InvalidInputError(
            f"the GenerationConfig option `{option}`={getattr(gen, option, None)!r} is not implemented by "
            f"nanoflow_fx's continuous batching; unset it (`{option}=None`), or use model.generate(), which runs "
            "transformers' own generate() for options its fast path lacks")


def _token_ids(ids: Any, name: str) -> list[int]:
    """`ids` as a list of ints: a sequence of ints (numpy ints too) or a 1-D integer tensor or array. Anything
    else raises `InvalidInputError` naming `name`: a float would be truncated and a bool read as 0 or 1."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1 or not _integer_dtype(ids):
            raise InvalidInputError(f"{name} is a {ids.ndim}-D {ids.dtype} tensor; give each prompt as a 1-D integer "
                                    "tensor or a list of token ids (ints)")
        return ids.tolist()
    if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{name} is a {type(ids).__name__}; give each prompt as a list of token ids (ints)")
    tokens = list(ids)
    for i, token in enumerate(tokens):
        if type(token) is not int and (isinstance(token, bool) or not isinstance(token, numbers.Integral)):
            raise InvalidInputError(f"{name}: token {i} is {token!r} ({type(token).__name__}), not a token id; give "
                                    "each prompt as a flat list of ints (a float or a bool is refused, not rounded)")
    return [int(t) for t in tokens]


def _integer_dtype(array: torch.Tensor | np.ndarray) -> bool:
    if isinstance(array, torch.Tensor):
        return not (array.dtype.is_floating_point or array.dtype.is_complex or array.dtype == torch.bool)
    return bool(np.issubdtype(array.dtype, np.integer))


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else list(value)
    return tuple(int(i) for i in ids if int(i) >= 0)  # transformers uses -1 for "no EOS"


class _Results:
    """Results not read yet: at most one per request, oldest request first. A newer result of a request replaces
    its unread one (the newer one's tokens extend it), so a stream read late skips updates but never goes back,
    and nothing piles up. A request with a handler (`register`) gets its results there instead."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.unread: dict[str, GenerationOutput] = {}  # insertion order: a replaced result keeps its place
        self.handlers: dict[str, tuple[Callable[[GenerationOutput], Any], asyncio.AbstractEventLoop]] = {}

    def put(self, result: GenerationOutput) -> None:
        with self.cond:
            handler = self.handlers.get(result.request_id)
            if handler is None:
                self.unread[result.request_id] = result
                self.cond.notify_all()
                return
            if result.is_finished():
                del self.handlers[result.request_id]
            handler[1].call_soon_threadsafe(handler[0], result)  # under the lock: the loop gets them in order

    def take(self, request_id: str | None, timeout: float | None,
             may_come: Callable[[], bool]) -> GenerationOutput | None:
        """The oldest unread result (of `request_id`, if given), waiting up to `timeout` seconds (None: no limit)
        while `may_come()` says one may still come; else None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                key = request_id if request_id is not None else next(iter(self.unread), None)
                if key in self.unread:
                    return self.unread.pop(key)
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not may_come():
                    return None
                self.cond.wait(left)

    def register(self, request_id: str, callback: Callable[[GenerationOutput], Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        """Send `request_id`'s results to `callback` on `loop` from now on, its unread one first."""
        with self.cond:
            unread = self.unread.pop(request_id, None)
            if unread is None or not unread.is_finished():
                self.handlers[request_id] = (callback, loop)
            if unread is not None:
                loop.call_soon_threadsafe(callback, unread)

    def has(self, request_id: str) -> bool:
        with self.cond:
            return request_id in self.unread

    def drop(self, request_ids: list[str]) -> None:
        """Forget the requests' unread results and handlers, and wake whoever waits for them."""
        with self.cond:
            for rid in request_ids:
                self.unread.pop(rid, None)
                self.handlers.pop(rid, None)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class ContinuousBatchingManager:
    """transformers' `ContinuousBatchingManager` on nanoflow's engine: a background thread steps the engine
    while requests are added, cancelled and read back (`get_result`, iteration, `request_id_iter`,
    `register_result_handler`). Unread results are kept per request (`_Results`): a streamed request's updates
    each extend the one before, and a finished or cancelled request leaves nothing behind once read."""

    def __init__(self, model: Any, engine: Engine, generation_config: GenerationConfig | None = None,
                 ends_session: bool = True) -> None:
        """Raises `InvalidInputError` for a GenerationConfig option the engine does not implement. A config
        without `eos_token_id` disables EOS (as transformers' `init_continuous_batching` does, with a warning;
        the caller's config is left as it is).

        Under tensor parallelism (`engine.plane`), rank 0's manager takes requests and its thread steps every
        rank's engine; on the other ranks `start()` follows those steps until rank 0's manager stops (its run is
        one session, `ends_session`), `add_request` returns None and `get_result` None, as transformers' do."""
        gen = generation_config if generation_config is not None else model.generation_config
        _check_options(gen)
        if gen.eos_token_id is None:
            log.warning("nanoflow_fx: `eos_token_id` is not set in the GenerationConfig: EOS is disabled (as in "
                        "transformers' continuous batching); requests stop at max_new_tokens or their own eos_token_id")
        self.model, self.engine, self.generation_config = model, engine, gen
        self._eos = _eos_ids(gen.eos_token_id)
        self._suppress = tuple(int(t) for t in gen.suppress_tokens or ())
        self._children = int(gen.num_return_sequences or 1) - 1
        self._results = _Results()
        self._requests: dict[str, Request] = {}  # live: `_deliver` drops the finished, `cancel_request` the cancelled
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_mode = 0  # 0 run, 1 flush then stop, 2 stop now
        self._looping = False  # the thread is started and its loop has not ended
        self._thread: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.warmed_up = True  # CUDA graphs are captured by optimize()
        self.plane = engine.plane
        self._ends_session = ends_session
        self._follower = self.plane is not None and not self.plane.is_driver

    # ------------------------------------------------------------------------------------- lifecycle
    def warmup(self) -> None:
        """Nothing to do: `optimize()` already captured the step and its CUDA graphs."""

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running():
            log.warning("nanoflow_fx: the continuous-batching manager is already running")
            return
        self._stop_mode, self.fatal_error, self._looping = 0, None, True
        target = self._follow if self._follower else self._loop
        self._thread = threading.Thread(target=target, name="nanoflow-engine", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """Stop the thread: after the queued requests finish, or at once with `hard_stop` (the unfinished ones end
        FAILED, as transformers fails them). Then `get_result` returns what is left unread, then None, and a
        consumer waiting in it is woken; `add_request` refuses new requests until `start()`."""
        if self._thread is None:
            log.warning("nanoflow_fx: the continuous-batching manager was not started")
            return
        self._stop_mode = 2 if hard_stop else max(self._stop_mode, 1)
        self._wake.set()
        if block:
            self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def destroy(self) -> None:
        if self.is_running():
            self.stop(block=True, hard_stop=True)

    def _loop(self) -> None:
        error: BaseException | str = "the manager was stopped (hard_stop=True) before this request finished"
        plane = self.plane
        try:
            while self._stop_mode < 2:
                if self._requests:
                    self.engine.step()
                elif self._stop_mode == 1:
                    break
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    if plane is not None and self._stop_mode < 2:  # (the other ranks wait in the next step's
                        self.engine.step()  # exchange: an idle step answers them, and takes what was added)
        except BaseException as err:  # noqa: BLE001 (any failure ends every request with its message)
            self.fatal_error = error = err
            log.error("nanoflow_fx: the continuous-batching loop failed: %s", err, exc_info=True)
        finally:
            with self._lock:
                left = list(self._requests.values())
            self.engine.fail(left, error)  # nothing more runs: end what is left (a hard stop's requests)
            if plane is not None and self._ends_session and self.fatal_error is None:
                plane.end_session(self.engine)  # (a step's failure was every rank's: no rank waits)
            self._looping = False
            self._results.wake()

    def _follow(self) -> None:
        """Tensor parallelism, ranks but 0: step as rank 0's manager steps, until it stops."""
        assert self.plane is not None
        try:
            self.plane.follow(self.engine)
        except BaseException as err:  # noqa: BLE001
            self.fatal_error = err
            log.error("nanoflow_fx: following rank 0's continuous batching failed: %s", err, exc_info=True)
        finally:
            self._looping = False
            self._results.wake()

    # ------------------------------------------------------------------------------- requests and results
    def add_request(self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None,
                    streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id: int | list[int] | None = None, **logit_processor_kwargs: Any) -> str | None:
        """Queue one request (transformers' arguments); returns its id, or None once the manager was stopped
        (or its loop failed): the request is dropped with a warning, as transformers does.

        Automatic ids (`req_N`) skip ids in use; a `request_id` in use (its request running, or a result of it
        not read yet) raises ValueError, and `input_ids` that are not token ids (`_token_ids`) raise
        InvalidInputError. With `num_return_sequences` n > 1, n - 1 more requests of the same prompt run with
        ids `{id}__child#{i}` (transformers' scheme; each samples on its own from its first token, as
        transformers' forks do). A request that can never run (too long, larger than the KV cache, ids outside
        the vocabulary, a sampling value out of range) is answered at once with a FAILED result naming the
        problem; the other requests are not affected."""
        if self._follower:
            log.warning("nanoflow_fx: add_request on tensor-parallel rank %d is ignored (returns None, as "
                        "transformers' does): requests enter on TP rank 0", self.plane.rank)  # type: ignore[union-attr]
            return None
        prompt = _token_ids(input_ids, "input_ids")
        with self._lock:  # a stop's last look at the live requests (`_loop`) comes before or after this whole block
            if self._stop_mode or self.fatal_error is not None:
                log.warning("nanoflow_fx: the continuous-batching manager is %s: a request of %d tokens is dropped "
                            "(add_request returns None, as transformers' does); call start() to add requests again",
                            "stopped" if self.fatal_error is None else "dead after an error", len(prompt))
                return None
            request_id = self._claim(request_id)
            for rid in self.family(request_id):
                self._queue(rid, prompt, max_new_tokens, streaming, record_timestamps, eos_token_id,
                            logit_processor_kwargs)
        self._wake.set()
        return request_id

    def _claim(self, request_id: str | None) -> str:
        """`request_id` if free, or a fresh automatic id; raises ValueError for one in use (under `_lock`)."""
        if request_id is None:
            request_id = f"req_{next(self._counter)}"
            while self._in_use(request_id):
                request_id = f"req_{next(self._counter)}"
        elif self._in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use by a request that has not finished or "
                             "whose result was not read yet; give another id (or None for a fresh one), or "
                             f"cancel_request({request_id!r}) first")
        return request_id

    def _in_use(self, request_id: str) -> bool:
        return any(rid in self._requests or self._results.has(rid) for rid in self.family(request_id))

    def _queue(self, request_id: str, prompt: list[int], max_new_tokens: float | None, streaming: bool,
               record_timestamps: bool, eos_token_id: int | list[int] | None, kwargs: dict[str, Any]) -> None:
        """Queue one request, or publish its FAILED result (under `_lock`, so the request is registered before
        `_deliver`, in the engine's thread, can forget it)."""
        try:
            params = self._sampling(len(prompt), eos_token_id, kwargs)
            max_new = self._max_new(len(prompt), max_new_tokens)
            req = self.engine.add_request(prompt, params, max_new, request_id, streaming, self._deliver,
                                          record_timestamps)
            self._requests[request_id] = req
        except (NanoFlowError, ValueError, TypeError) as err:
            req = Request(request_id, prompt, SamplingParams(False, 1.0, 0, 1.0, (), 0), 0, state=FAILED,
                          error=str(err))
            self._results.put(to_output(req))

    def add_requests(self, inputs: list[list[int]], max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, **logit_processor_kwargs: Any) -> list[str | None]:
        return [self.add_request(ids, None, max_new_tokens, streaming, record_timestamps, **logit_processor_kwargs)
                for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Drop a request and its `num_return_sequences` children: their KV pages are freed at once, unread
        results dropped, and no further result comes (transformers delivers none either); a consumer waiting for
        it gets None."""
        ids = self.family(request_id)
        with self._lock:
            requests = [self._requests.pop(rid, None) for rid in ids]
        for req in requests:
            if req is not None:
                self.engine.cancel(req)
        self._results.drop(ids)

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The oldest unread result (of `request_id`, if given; a streamed request's latest), waiting up to
        `timeout` seconds (None: as long as one may come). None after the timeout, and at once when none can
        come: the manager is not running (as transformers returns None then) or `request_id` is not a live
        request (cancelled, unknown, or its final result was read)."""
        def may_come() -> bool:
            return self._looping and not self._follower and (request_id is None or request_id in self._requests)

        return self._results.take(request_id, timeout, may_come)

    def __iter__(self) -> Iterator[GenerationOutput]:
        """Every result as it comes, until the manager has stopped and none is left unread."""
        while (result := self.get_result()) is not None:
            yield result

    def request_id_iter(self, request_id: str) -> Generator[GenerationOutput]:
        """The results of `request_id` as they come, up to its final one (each streamed update extends the one
        before); ends early if the request was cancelled or the manager stopped."""
        while (result := self.get_result(request_id=request_id)) is not None:
            yield result
            if result.is_finished():
                return

    def register_result_handler(self, request_id: str, callback: Callable[[GenerationOutput], Any]) -> None:
        """transformers' per-request delivery: each result of `request_id` (every update when streaming, else the
        final one) goes to `callback` on the caller's running asyncio loop (`call_soon_threadsafe`) instead of
        `get_result`; the handler is dropped after the final result. A result already unread is handed over."""
        self._results.register(request_id, callback, asyncio.get_running_loop())

    def family(self, request_id: str) -> list[str]:
        """The ids a request added as `request_id` answers under: its `num_return_sequences - 1` children, then
        itself (transformers' order)."""
        return [*(f"{request_id}__child#{i}" for i in range(self._children)), request_id]

    def cancel_all(self) -> None:
        """Cancel every live request (see `cancel_request`)."""
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
        for req in requests:
            self.engine.cancel(req)
        self._results.drop([r.request_id for r in requests])

    # ------------------------------------------------------------------------------------------ helpers
    def _deliver(self, req: Request) -> None:
        """The engine's listener (in a step): publish, then forget a finished request, so a consumer always
        finds the live request or its result."""
        self._results.put(to_output(req))
        if req.finished:
            with self._lock:
                self._requests.pop(req.request_id, None)

    def _sampling(self, prompt_len: int, eos_token_id: int | list[int] | None,
                  kwargs: dict[str, Any]) -> SamplingParams:
        """The request's sampling parameters: its keywords over the config's, each checked (type and range)."""
        unknown = sorted(set(kwargs) - set(_UNSET))
        if unknown:
            raise ValueError(f"unknown per-request sampling arguments {unknown}; add_request takes {sorted(_UNSET)} "
                             "(other options go in the GenerationConfig)")
        gen, values = self.generation_config, {}
        for key, unset in _UNSET.items():
            value = kwargs.get(key, getattr(gen, key, None))
            values[key] = unset if value is None else sampling_value(key, value)
        eos = self._eos if eos_token_id is None else _eos_ids(eos_token_id)
        min_new = max(gen.min_new_tokens or 0, (gen.min_length or 0) - prompt_len, 0)
        top_k = cast(int, values["top_k"])  # (sampling_value's top_k is an int, as _UNSET's)
        params = SamplingParams(bool(gen.do_sample), values["temperature"], top_k, values["top_p"], eos,
                                min_new, self._suppress)
        params.check()
        return params

    def _max_new(self, prompt_len: int, max_new_tokens: float | None) -> int:
        """The request's `max_new_tokens`, else the config's, rounded up (2.5 gives 3, as HF's generate():
        `generate._max_new_tokens`); else what the config's `max_length` leaves; else what `max_seq_len` leaves
        (transformers: no limit but EOS)."""
        gen = self.generation_config
        if max_new_tokens is not None or gen.max_new_tokens is not None or gen.max_length is not None:
            return _max_new_tokens(self.model, gen, prompt_len, default_max_length=False, max_new_tokens=max_new_tokens)
        max_seq_len = self.engine.config.max_seq_len
        assert max_seq_len is not None  # (resolved by optimize(): `config.resolve`)
        if prompt_len >= max_seq_len:
            raise RequestTooLongError(
                f"the prompt of {prompt_len} tokens is too long for NanoFlowConfig.max_seq_len={max_seq_len}: with no "
                "max_new_tokens given a request may generate up to max_seq_len minus its prompt, which leaves nothing; "
                "raise max_seq_len in optimize() or shorten the prompt")
        return max_seq_len - prompt_len


def generate_batch(model: Any, engine: Engine, inputs: list[list[int]],
                   generation_config: GenerationConfig | None = None, progress_bar: bool = False,
                   record_timestamps: bool = False, request_ids: Sequence[str] | None = None,
                   **kwargs: Any) -> dict[str, GenerationOutput]:
    """transformers' `generate_batch`: every prompt as a request of a manager of its own, whose thread steps the
    engine while the caller waits for the results, as transformers' does. So an interrupt (Ctrl-C) or an error
    in the caller lands outside any step and cancels only this call's requests; other callers' requests run on.
    Results by request id in input order, a prompt's `num_return_sequences` results as transformers orders them
    (`{id}__child#0`, ..., then `{id}`); failed requests included, with their error.

    Every entry of `inputs` is checked (`_token_ids`) before any is queued. Keywords are GenerationConfig fields
    (`max_new_tokens=`, `do_sample=True`, ...) applied to a copy of the config, as `generate()` takes them
    (transformers 5.25's `generate_batch` reads `max_new_tokens` and ignores every other keyword); a keyword
    that is not a field is refused by name. `request_ids`: the prompts' ids (default `req_0`, `req_1`, ...)."""
    plane = engine.plane
    if plane is None:
        return _generate_batch(model, engine, inputs, generation_config, progress_bar, record_timestamps, kwargs,
                               request_ids=request_ids)
    failed: list[ContinuousBatchingManager] = []  # (tensor parallelism, rank 0: the session ends for every rank)
    try:
        results = _generate_batch(model, engine, inputs, generation_config, progress_bar, record_timestamps, kwargs,
                                  failed, request_ids)
    except BaseException as err:
        if not failed:
            plane.end_session(engine, err)
        raise
    if not failed:
        plane.end_session(engine)
    return results


def _generate_batch(model: Any, engine: Engine, inputs: list[list[int]], generation_config: GenerationConfig | None,
                    progress_bar: bool, record_timestamps: bool, kwargs: dict[str, Any],
                    failed: list[ContinuousBatchingManager] | None = None,
                    request_ids: Sequence[str] | None = None) -> dict[str, GenerationOutput]:
    """`generate_batch`'s run; a manager whose loop failed in a step goes in `failed`."""
    if not inputs:
        return {}
    gen = generation_config if generation_config is not None else model.generation_config
    manager = ContinuousBatchingManager(model, engine, _with_keywords(gen, kwargs), ends_session=False)
    prompts = [_token_ids(ids, f"inputs[{i}]") for i, ids in enumerate(inputs)]
    results: dict[str, GenerationOutput] = {}
    ids: list[str] = []
    manager.start()
    try:
        if request_ids is None:
            parents = manager.add_requests(prompts, record_timestamps=record_timestamps)
        else:
            parents = [manager.add_request(p, rid, record_timestamps=record_timestamps)
                       for p, rid in zip(prompts, request_ids, strict=True)]
        # (a None parent, a request the manager dropped because its loop had already died, gets no result: its ids
        # are not answered)
        ids = [rid for parent in parents for rid in manager.family(parent)]  # type: ignore[arg-type]
        with _Progress(len(ids), progress_bar, engine) as progress:
            while len(results) < len(ids):
                result = manager.get_result(timeout=0.5)
                if result is None and not manager.is_running():
                    break  # the loop failed; its requests were answered first
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                    progress.done(1)
                progress.refresh()
    finally:
        manager.cancel_all()  # a no-op unless the caller was interrupted: only this call's requests
        manager.stop(block=True, hard_stop=True)
        if manager.fatal_error is not None and failed is not None:
            failed.append(manager)
    return {rid: results[rid] for rid in ids if rid in results}


def _with_keywords(gen: GenerationConfig, kwargs: dict[str, Any]) -> GenerationConfig:
    """A copy of `gen` with the GenerationConfig fields in `kwargs` set; raises naming any other keyword."""
    if not kwargs:
        return gen
    unknown = sorted(set(kwargs) - set(gen.to_dict()))
    if unknown:
        raise ValueError(f"generate_batch got keyword arguments that are not GenerationConfig fields: {unknown}; pass "
                         "GenerationConfig fields (max_new_tokens=..., do_sample=True, ...) or a GenerationConfig")
    gen = copy.deepcopy(gen)
    gen.update(**kwargs)
    return gen


class _Progress:
    """A tqdm bar of requests done, with the live input and output token rates (nothing when disabled)."""

    def __init__(self, total: int, enabled: bool, engine: Engine) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"Solving {total} requests", unit="request")
        self.engine, self.start, self.last = engine, time.perf_counter(), 0.0
        self.base = (engine.stats.prefill_tokens, engine.stats.generated_tokens)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.refresh(force=True)
            self.bar.close()

    def done(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.bar is None or (not force and now - self.last < 0.5):
            return
        self.last, elapsed = now, max(now - self.start, 1e-9)
        stats = self.engine.stats
        self.bar.set_postfix(input_tok_s=f"{(stats.prefill_tokens - self.base[0]) / elapsed:,.0f}",
                             output_tok_s=f"{(stats.generated_tokens - self.base[1]) / elapsed:,.0f}",
                             running=len(self.engine.running), refresh=False)
        self.bar.refresh()

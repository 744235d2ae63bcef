"""transformers' continuous-batching contract on nanoflow's engine: `generate_batch` and a streaming manager.

`model.generate_batch(inputs, generation_config=None, ...)` and `model.init_continuous_batching(...)` take
transformers' arguments and return its types (`GenerationOutput` per request id, `RequestStatus`), so code
written for transformers' continuous batching runs unchanged; the requests run on the optimized model's one
engine (`runtime.engine.Engine`), with its dense steps, paged KV cache and CUDA graphs. Per request:
`max_new_tokens`, `eos_token_id` and the sampling keywords `temperature`, `top_k`, `top_p`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

from transformers import GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.continuous_batching.requests import GenerationOutput

from nanoflow_fx.errors import NanoFlowError
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.requests import FAILED, FINISHED, PENDING, RUNNING, Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["ContinuousBatchingManager", "generate_batch", "to_output"]

log = logging.getLogger(__name__)

_SAMPLING_KWARGS = {"temperature": float, "top_k": int, "top_p": float}
# What an unset option means (transformers' continuous batching builds its processors from the config as given:
# an unset top_k adds no top-k warper).
_UNSET = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


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


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else list(value)
    return tuple(int(i) for i in ids if int(i) >= 0)  # transformers uses -1 for "no EOS"


class ContinuousBatchingManager:
    """transformers' `ContinuousBatchingManager` on nanoflow's engine: a background thread steps the engine
    while requests are added, cancelled and read back (`get_result`, iteration, `request_id_iter`)."""

    def __init__(self, model: Any, engine: Engine, generation_config: GenerationConfig | None = None) -> None:
        self.model, self.engine = model, engine
        self.generation_config = generation_config if generation_config is not None else model.generation_config
        self.output_queue: queue.Queue[GenerationOutput] = queue.Queue()
        self._requests: dict[str, Request] = {}
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_mode = 0  # 0 run, 1 flush then stop, 2 stop now
        self._thread: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.warmed_up = True  # CUDA graphs are captured by optimize()

    # ------------------------------------------------------------------------------------- lifecycle
    def warmup(self) -> None:
        """Nothing to do: `optimize()` already captured the step and its CUDA graphs."""

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running():
            log.warning("nanoflow_fx: the continuous-batching manager is already running")
            return
        self._stop_mode, self.fatal_error = 0, None
        self._thread = threading.Thread(target=self._loop, name="nanoflow-engine", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """Stop the thread: after the queued requests finish, or at once with `hard_stop` (those are cancelled)."""
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
        engine = self.engine
        try:
            while self._stop_mode < 2:
                with self._lock:
                    busy = any(not r.finished for r in self._requests.values())
                if busy:
                    engine.step()
                elif self._stop_mode == 1:
                    break
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as err:  # noqa: BLE001 (any failure ends every request with its message)
            self.fatal_error = err
            log.error("nanoflow_fx: the continuous-batching loop failed: %s", err, exc_info=True)
            with self._lock:
                pending = [r for r in self._requests.values() if not r.finished]
            engine.fail(pending, err)
        finally:
            self.cancel_all()  # after a hard stop nothing more runs: free what is left

    # ------------------------------------------------------------------------------- requests and results
    def add_request(self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None,
                    streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id: int | list[int] | None = None, **logit_processor_kwargs: Any) -> str:
        """Queue one request (transformers' arguments); returns its id. A request that can never run (too long,
        larger than the KV cache, bad token ids) is answered at once with a FAILED result naming the problem."""
        with self._lock:
            if request_id is None:
                request_id = f"req_{next(self._counter)}"
        gen = self.generation_config
        eos = gen.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        prompt = [int(t) for t in input_ids]
        max_new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new is None:  # transformers: no limit but EOS; ours: the longest sequence the engine takes
            max_new = self.engine.config.max_seq_len - len(prompt)
        try:
            params = self._sampling(gen, _eos_ids(eos), logit_processor_kwargs)
            with self._lock:  # registered before `_deliver` (the engine's thread, under this lock) can hear of it
                req = self.engine.add_request(prompt, params, int(max_new), request_id, streaming, self._deliver,
                                              record_timestamps)
                self._requests[request_id] = req
        except (NanoFlowError, ValueError, TypeError) as err:
            req = Request(request_id, prompt, SamplingParams(False, 1.0, 0, 1.0, (), 0), 0, state=FAILED,
                          error=str(err))
            self.output_queue.put(to_output(req))
            return request_id
        self._wake.set()
        return request_id

    def add_requests(self, inputs: list[list[int]], max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, **logit_processor_kwargs: Any) -> list[str]:
        return [self.add_request(ids, None, max_new_tokens, streaming, record_timestamps, **logit_processor_kwargs)
                for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Drop a request; its KV pages are freed at once and no result is delivered (as transformers does)."""
        with self._lock:
            req = self._requests.pop(request_id, None)
        if req is not None:
            self.engine.cancel(req)

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The next result (of `request_id`, if given), or None after `timeout` seconds."""
        try:
            result = self.output_queue.get(block=True, timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            self.output_queue.put(result)
            return None
        return result

    def __iter__(self) -> Iterator[GenerationOutput]:
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(timeout=0.1)
            if result is not None:
                yield result

    def request_id_iter(self, request_id: str) -> Generator[GenerationOutput]:
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(request_id=request_id, timeout=0.1)
            if result is not None:
                yield result
                if result.is_finished():
                    return

    def cancel_all(self) -> None:
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
        for req in requests:
            self.engine.cancel(req)

    # ------------------------------------------------------------------------------------------ helpers
    def _deliver(self, req: Request) -> None:
        if req.finished:
            with self._lock:
                self._requests.pop(req.request_id, None)
        self.output_queue.put(to_output(req))

    @staticmethod
    def _sampling(gen: GenerationConfig, eos: tuple[int, ...], kwargs: dict[str, Any]) -> SamplingParams:
        unknown = sorted(set(kwargs) - set(_SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"unknown per-request sampling arguments {unknown}; known: {sorted(_SAMPLING_KWARGS)}")
        values = {}
        for key, cast in _SAMPLING_KWARGS.items():
            value = kwargs.get(key, getattr(gen, key, None))
            values[key] = cast(_UNSET[key] if value is None else value)
        return SamplingParams(do_sample=bool(gen.do_sample), temperature=values["temperature"],
                              top_k=int(values["top_k"] or 0), top_p=values["top_p"], eos_token_ids=eos,
                              min_new_tokens=int(gen.min_new_tokens or 0))


def generate_batch(model: Any, engine: Engine, inputs: list[list[int]],
                   generation_config: GenerationConfig | None = None, progress_bar: bool = False,
                   record_timestamps: bool = False, **kwargs: Any) -> dict[str, GenerationOutput]:
    """transformers' `generate_batch`: every prompt as a request of the engine, run to completion in the
    calling thread; results by request id in input order (failed requests included, with their error)."""
    if not inputs:
        return {}
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    manager = ContinuousBatchingManager(model, engine, generation_config)
    ids = manager.add_requests(inputs, max_new_tokens=max_new_tokens, record_timestamps=record_timestamps, **kwargs)
    results: dict[str, GenerationOutput] = {}
    with _Progress(len(ids), progress_bar, engine) as progress:
        try:
            while len(results) < len(ids):
                result = manager.get_result(timeout=0)
                if result is None:
                    engine.step()
                    progress.refresh()
                elif result.is_finished():
                    results[result.request_id] = result
                    progress.done(1)
        finally:
            manager.cancel_all()
    return {rid: results[rid] for rid in ids if rid in results}


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

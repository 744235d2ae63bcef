"""The server's HTTP side in processes of its own: the engine's process runs an `EngineBridge`, each HTTP process a
`RemoteBackend` (`frontend.py`), joined by a `multiprocessing` pipe each.

Why: the HTTP side's work grows with the streams (an event loop, a detokenization and a server-sent event per token
and stream); in the engine's process it would take turns with the engine's thread on one interpreter lock, and the
engine's steps would wait for it. vLLM and transformers' own server split the same way.

Messages (pickled tuples):
- HTTP side to engine: `("add", id, prompt, sampling, prompt_param)`, `("cancel", id)`, `("close",)`.
- Engine to HTTP side: `("accepted", id, max_new_tokens, eos_token_id)`, `("refused", id, status, message, type,
  param, code)` (an `APIError`), `("updates", [(id, start, tokens, finished, error), ...])`: one message per
  manager per step at most, each request's tokens from index `start` on, only what its HTTP side has not had;
  `("dead", message)`: the engine's loop failed (before the failed requests' updates).
Either side can fall behind without holding the other up: the engine's thread never sends (the managers keep one
result per request, the latest: the bridge's threads read them), and the HTTP side merges what it did not get to.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from nanoflow_fx.server.generation import Backend, EngineRequests, Submitted, engine_dead
from nanoflow_fx.server.protocol import APIError, Sampling

__all__ = ["EngineBridge", "RemoteBackend"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a bridge thread looks at its manager when no result comes


class EngineBridge:
    """The engine's side of the pipes: a thread per pipe takes requests (`EngineRequests.plan` and `add`; a
    refusal goes back as its `APIError`) and cancellations; a thread per manager reads its results and sends each
    pipe one message of its requests' new tokens. A pipe whose HTTP side is gone has its requests cancelled."""

    def __init__(self, requests: EngineRequests, conns: Sequence[Connection]) -> None:
        self.requests, self.conns = requests, list(conns)
        self._routes: dict[str, list[int]] = {}  # request id -> [pipe, tokens already sent]
        self._lock = threading.Lock()
        self._send_locks = [threading.Lock() for _ in self.conns]
        self._closed = threading.Event()
        self._dead_sent = False
        self._threads = [threading.Thread(target=self._receive, args=(i,), name=f"nanoflow-bridge-in-{i}",
                                          daemon=True) for i in range(len(self.conns))]
        self._threads += [threading.Thread(target=self._send_results, args=(m,), name=f"nanoflow-bridge-out-{k}",
                                           daemon=True) for k, m in enumerate(requests.managers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the threads and end the pipes (an HTTP side still there sees its pipe end, and leaves)."""
        self._closed.set()
        for pipe, conn in enumerate(self.conns):
            with self._send_locks[pipe]:
                _shut(conn)  # (wakes the thread reading it: closing alone would not, nor end the pipe)
        for thread in self._threads:
            thread.join(5)
        for conn in self.conns:
            conn.close()

    # ------------------------------------------------------------------------------------------- requests
    def _receive(self, pipe: int) -> None:
        conn = self.conns[pipe]
        try:
            while not self._closed.is_set():
                message = conn.recv()
                if message[0] == "add":
                    self._add(pipe, *message[1:])
                elif message[0] == "cancel":
                    with self._lock:
                        self._routes.pop(message[1], None)
                    self.requests.cancel(message[1])
                elif message[0] == "close":
                    break
        except (EOFError, OSError):  # the HTTP side is gone (or `close`)
            pass
        except BaseException as err:  # noqa: BLE001 (logged: a thread's failure must not pass silently)
            log.error("nanoflow_fx server: the bridge's pipe %d failed", pipe, exc_info=err)
        finally:
            with self._send_locks[pipe]:
                conn.close()  # (the HTTP side, if it left with "close", waits for the pipe's end)
            with self._lock:
                orphans = [rid for rid, (p, _) in self._routes.items() if p == pipe]
                for rid in orphans:
                    del self._routes[rid]
            for rid in orphans:
                self.requests.cancel(rid)

    def _add(self, pipe: int, request_id: str, prompt: list[int], sampling: Sampling, prompt_param: str) -> None:
        try:
            plan = self.requests.plan(prompt, sampling, prompt_param)
            with self._lock:  # (routed before it is added: its first result may come at once)
                self._routes[request_id] = [pipe, 0]
            self.requests.add(plan, request_id)
        except Exception as err:  # noqa: BLE001 (a refusal, or the server's own failure: this request's alone)
            with self._lock:
                self._routes.pop(request_id, None)
            if not isinstance(err, APIError):
                log.error("nanoflow_fx server: adding a request failed", exc_info=err)
                err = APIError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                               type="server_error")
            self._send(pipe, ("refused", request_id, err.status, err.message, err.type, err.param, err.code))
        else:
            self._send(pipe, ("accepted", request_id, plan.max_new_tokens, plan.eos_token_id))

    # -------------------------------------------------------------------------------------------- results
    def _send_results(self, manager: Any) -> None:
        try:
            while not self._closed.is_set():
                first = manager.get_result(timeout=_POLL_S)
                if manager.fatal_error is not None and not self._dead_sent:
                    self._dead_sent = True  # (before the failed requests' updates: they say why)
                    for pipe in range(len(self.conns)):
                        self._send(pipe, ("dead", str(manager.fatal_error)))
                if first is None:
                    if not manager.is_running():
                        self._closed.wait(_POLL_S)  # (get_result does not wait then)
                    continue
                results = [first]
                while (result := manager.get_result(timeout=0)) is not None:
                    results.append(result)
                self._route(results)
        except BaseException as err:  # noqa: BLE001
            log.error("nanoflow_fx server: the bridge's result thread failed", exc_info=err)

    def _route(self, results: list[Any]) -> None:
        updates: dict[int, list[tuple[str, int, list[int], bool, str | None]]] = {}
        with self._lock:
            for result in results:
                route = self._routes.get(result.request_id)
                if route is None:  # (cancelled meanwhile)
                    continue
                pipe, sent = route
                tokens, finished = result.generated_tokens, result.is_finished()
                start = sent if len(tokens) >= sent else 0
                error = None if result.error is None else str(result.error)
                updates.setdefault(pipe, []).append((result.request_id, start, tokens[start:], finished, error))
                if finished:
                    del self._routes[result.request_id]
                else:
                    route[1] = len(tokens)
        for pipe, batch in updates.items():
            self._send(pipe, ("updates", batch))

    def _send(self, pipe: int, message: tuple[Any, ...]) -> None:
        try:
            with self._send_locks[pipe]:
                self.conns[pipe].send(message)
        except (OSError, ValueError):  # the HTTP side is gone: its receiving thread cancels its requests
            pass


def _shut(conn: Connection) -> None:
    """End a pipe both ways now, even while a thread reads it."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):  # (already closed)
        pass


class RemoteBackend(Backend):
    """The HTTP process's side of its pipe: requests go to the engine's process as messages; a thread reads the
    answers and hands them to the event loop, all that came since its last turn at once. `on_gone` (on the loop) is
    called if the engine's process goes away (the server should then exit)."""

    def __init__(self, conn: Connection, prefix: str = "srv", on_gone: Callable[[], None] | None = None) -> None:
        self.conn, self.prefix, self.on_gone = conn, prefix, on_gone
        self._ids = itertools.count()
        self._requests: dict[str, Submitted] = {}
        self._waiting: dict[str, tuple[asyncio.Future[None], Submitted]] = {}  # added, not yet accepted or refused
        self._inbox: list[tuple[Any, ...]] = []
        self._inbox_lock = threading.Lock()
        self._scheduled = False
        self._fatal: str | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="nanoflow-http-pipe", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self.conn.send(("close",))
        except (OSError, ValueError):
            pass
        if self._reader is not None:
            self._reader.join(5)
        self.conn.close()

    async def submit(self, prompt: list[int], sampling: Sampling, prompt_param: str) -> Submitted:
        if self._fatal is not None:
            raise engine_dead(self._fatal)
        request_id = f"{self.prefix}-{next(self._ids)}"
        request = Submitted(request_id, 0, -1)  # (its limits come with "accepted")
        accepted = asyncio.get_running_loop().create_future()
        self._requests[request_id], self._waiting[request_id] = request, (accepted, request)
        try:
            self.conn.send(("add", request_id, prompt, sampling, prompt_param))
        except BaseException:
            self._requests.pop(request_id, None)
            self._waiting.pop(request_id, None)
            raise
        try:
            await accepted
        except APIError:  # refused (nothing was added), or the engine's process is gone: `_dispatch` forgot it
            raise
        except BaseException:  # the client left while it was being added: the engine drops it
            self._waiting.pop(request_id, None)
            self.cancel(request)
            raise
        return request

    def cancel(self, request: Submitted) -> None:
        if self._requests.pop(request.request_id, None) is not None and self._fatal is None:
            try:
                self.conn.send(("cancel", request.request_id))
            except (OSError, ValueError):
                pass

    # ---------------------------------------------------------------------------------------- the pipe
    def _read(self) -> None:
        assert self._loop is not None
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("gone",)
            with self._inbox_lock:
                self._inbox.append(message)
                wake, self._scheduled = not self._scheduled, True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch)
                except RuntimeError:  # the loop is closed: nobody listens any more
                    return
            if message[0] == "gone":
                return

    def _dispatch(self) -> None:
        with self._inbox_lock:
            messages, self._inbox, self._scheduled = self._inbox, [], False
        for message in messages:
            kind = message[0]
            if kind == "updates":
                for request_id, start, tokens, finished, error in message[1]:
                    request = self._requests.get(request_id)
                    if request is not None:
                        request.update(start, tokens, finished, error)
                        if request.finished:
                            del self._requests[request_id]
            elif kind == "accepted":  # (its updates may have come first, even its last)
                _, request_id, max_new_tokens, eos_token_id = message
                pending = self._waiting.get(request_id)
                if pending is not None:
                    pending[1].max_new_tokens, pending[1].eos_token_id = max_new_tokens, eos_token_id
                self._settle(request_id, None)
            elif kind == "refused":
                _, request_id, status, text, type_, param, code = message
                self._requests.pop(request_id, None)
                self._settle(request_id, APIError(status, text, type=type_, param=param, code=code))
            elif kind == "dead":
                self._fatal = message[1]
            elif kind == "gone" and not self._stopping:
                self._engine_gone()

    def _settle(self, request_id: str, error: APIError | None) -> None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None and not waiting[0].done():
            if error is None:
                waiting[0].set_result(None)
            else:
                waiting[0].set_exception(error)

    def _engine_gone(self) -> None:
        """The engine's process ended: every request fails, every new one is refused, the server should exit."""
        self._fatal = self._fatal or "the engine's process ended"
        log.error("nanoflow_fx server: the engine's process ended; this HTTP process stops")
        for request_id in list(self._waiting):
            self._settle(request_id, engine_dead(self._fatal))
        for request in self._requests.values():
            request.update(len(request.tokens), [], True, self._fatal)
        self._requests.clear()
        if self.on_gone is not None:
            self.on_gone()

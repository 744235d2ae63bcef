"""`serve`: load (or take) a model, optimize it, and serve it over HTTP until SIGTERM or Ctrl-C. The engine runs in
this process; the HTTP side (uvicorn, FastAPI, detokenization) in processes of its own (`HTTPProcesses`), so its
work never holds the interpreter the engine's steps need."""

from __future__ import annotations

import http.client
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import uvicorn

from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.server.app import make_app
from nanoflow_fx.server.bridge import EngineBridge
from nanoflow_fx.server.generation import EngineRequests

__all__ = ["HTTPProcesses", "load", "serve"]

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BACKLOG = 4096  # connections the socket queues before the HTTP processes take them


def load(name_or_path: str, dtype: str = "auto", device: str | None = None,
         config: NanoFlowConfig | dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a hub name or a local directory (`from_pretrained`), optimized by
    `nanoflow_fx.optimize(model, config)`. `dtype`: "auto" (the checkpoint's), "float32", "float16" or "bfloat16";
    `device`: default "cuda" when there is a GPU, else "cpu"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nanoflow_fx

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    # (.to(device), not device_map=device: that needs the accelerate package)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    torch.nn.Module.to(model, device)  # (in place; transformers' typed `to` wrapper confuses mypy)
    model.eval()
    return nanoflow_fx.optimize(model, config), tokenizer


def serve(model: Any, tokenizer: Any = None, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str | None = None, config: NanoFlowConfig | dict[str, Any] | None = None,
          dtype: str = "auto", device: str | None = None, log_level: str = "info", http_processes: int = 2) -> None:
    """Serve `model` with OpenAI's API on `host`:`port` until SIGTERM or Ctrl-C, which stop taking connections,
    let the requests in flight finish, and return.

    `model`: a hub name or a local directory (loaded by `load` with `dtype`, `device` and `config`), or a model
    object, optimized here with `config` unless it already is (`tokenizer` is then needed). `model_name`: the name
    clients give as `model` (default: the name or path, else the model's `name_or_path`). `http_processes`: how
    many processes answer HTTP (`HTTPProcesses`); 0 answers it on a thread of this process instead (uvicorn on
    `make_app`: simpler to debug, slower under many streams)."""
    if isinstance(model, str):
        model_name = model_name or model
        loaded, loaded_tokenizer = load(model, dtype, device, config)
        model, tokenizer = loaded, tokenizer if tokenizer is not None else loaded_tokenizer
    elif "nanoflow" not in model.__dict__:
        import nanoflow_fx

        model = nanoflow_fx.optimize(model, config)
    if tokenizer is None:
        raise ValueError("serve(model, tokenizer): a model object needs its tokenizer (AutoTokenizer.from_pretrained)")
    if http_processes < 0:
        raise ValueError(f"http_processes={http_processes}: give 1 or more, or 0 for HTTP on a thread of this process")
    if http_processes == 0:
        # No limit on the graceful shutdown: SIGTERM waits for every request in flight (a second signal forces it).
        uvicorn.Server(uvicorn.Config(make_app(model, tokenizer, model_name), host=host, port=port,
                                      log_level=log_level, timeout_graceful_shutdown=None)).run()
        return
    with HTTPProcesses(model, tokenizer, model_name, host=host, port=port, processes=http_processes,
                       log_level=log_level) as server:
        log.info("nanoflow_fx: serving %s on %s (%d HTTP processes); SIGTERM or Ctrl-C to stop", server.name,
                 server.url, http_processes)
        server.wait()


class HTTPProcesses:
    """The server with its HTTP side in `processes` processes of its own (`python -m nanoflow_fx.server.frontend`,
    sharing one listening socket) and the engine in this one: an `EngineBridge` joins them, a pipe each. Entering
    waits until the server answers `/health`; `wait()` serves until SIGTERM or Ctrl-C (forwarded to the HTTP
    processes as SIGTERM: they drain their connections, then exit; a second signal forces them) or until an HTTP
    process dies; leaving (or `close()`) stops the HTTP processes, then the engine's managers."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str | None = None, *, host: str = "127.0.0.1",
                 port: int = 8000, processes: int = 1, log_level: str = "info", start_timeout: float = 300.0) -> None:
        if processes < 1:
            raise ValueError(f"processes={processes}: an HTTP side needs at least one process")
        self.requests = EngineRequests(model, tokenizer.eos_token_id, model_name)
        self.name = self.requests.name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=_BACKLOG)
        bound = sock.getsockname()
        self.host, self.port = host, bound[1]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{self.port}"
        self.children: list[subprocess.Popen[bytes]] = []
        self._signals = 0
        self.bridge: EngineBridge | None = None
        pipes: list[Connection] = []
        self.requests.start()
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)}
            for index in range(processes):
                ours, theirs = multiprocessing.Pipe()
                self.children.append(subprocess.Popen(
                    [sys.executable, "-m", "nanoflow_fx.server.frontend", "--pipe", str(theirs.fileno()),
                     "--socket", str(sock.fileno())], pass_fds=(theirs.fileno(), sock.fileno()), env=env,
                    start_new_session=True))  # (Ctrl-C reaches this process only, which forwards one SIGTERM)
                theirs.close()
                ours.send(dict(tokenizer=tokenizer, name=self.name, log_level=log_level, index=index,
                               backlog=_BACKLOG))
                pipes.append(ours)
            self.bridge = EngineBridge(self.requests, pipes)
            self.bridge.start()
            self._wait_ready(start_timeout)
        except BaseException:
            sock.close()
            self.close()
            raise
        sock.close()  # (the HTTP processes hold it)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [c.returncode for c in self.children if c.poll() is not None]
            if dead:
                raise RuntimeError(f"an HTTP process of the server exited while starting (status {dead[0]}); its "
                                   "output above says why")
            conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server's HTTP processes did not answer /health within {timeout:.0f} s")
            time.sleep(0.1)

    def wait(self) -> None:
        """Serve until SIGTERM or Ctrl-C (in the main thread; elsewhere until `close()`) or an HTTP process dies
        (then the others are stopped and RuntimeError says so)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._forward)
        try:
            while all(c.poll() is None for c in self.children):
                time.sleep(0.1)
            crashed = [c.returncode for c in self.children if c.poll() is not None]
            if not self._signals and crashed:
                raise RuntimeError(f"an HTTP process of the server exited (status {crashed[0]}); the server stops")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM to the HTTP processes still running (a second one forces their exit)."""
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Stop the HTTP processes (they drain their connections first), then the bridge and the managers."""
        if any(c.poll() is None for c in self.children) and not self._signals:
            self._signals += 1
            self.terminate()
        for child in self.children:
            try:
                child.wait(600)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self.bridge is not None:
            self.bridge.close()
        self.requests.stop()

    def __enter__(self) -> HTTPProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

"""`nanoflow-fx serve` as a user runs it: a process of its own serving a model saved with `save_pretrained` (one
for the module), its reply equal to HF's greedy `generate()`, and SIGTERM letting a request in flight finish
before it exits. Also: the package without the `serve` extra never imports the server's packages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import nanoflow_fx.cli
from tests.helpers import hf_greedy
from tests.tiny_models import build, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = '{"max_batch_size": 4, "max_seq_len": 256, "page_size": 4, "num_pages": 256}'


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    path = tmp_path_factory.mktemp("tiny-llama")
    build("llama").save_pretrained(path)  # the weights of tests.helpers.reference("llama")
    word_tokenizer().save_pretrained(path)
    port = _free_port()
    log = path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nanoflow_fx.cli", "serve", str(path), "--port", str(port), "--device", "cpu",
             "--dtype", "float32", "--config", CONFIG, "--served-model-name", "tiny", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield process, url, path
    if process.poll() is None:
        process.kill()
        process.wait(30)


def test_the_served_model_replies_as_generate(server: tuple[subprocess.Popen[str], str, Path]) -> None:
    _, url, path = server
    tokenizer = word_tokenizer()
    ids = tokenizer("w3 w4 w5 w6")["input_ids"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="tiny", prompt="w3 w4 w5 w6", max_tokens=10, temperature=0)
    want = hf_greedy("llama", tuple(ids), 10, 2)
    text = tokenizer.decode(ids + list(want), skip_special_tokens=True)[len("w3 w4 w5 w6"):]
    assert reply.choices[0].text == text and reply.usage.completion_tokens == len(want)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_sigterm_lets_the_request_in_flight_finish_then_exits(server: tuple[subprocess.Popen[str], str, Path]
                                                              ) -> None:
    process, url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    first = threading.Event()
    got: dict[str, Any] = {}

    def stream() -> None:
        pieces = []
        for chunk in client.completions.create(model="tiny", prompt="w1 w2", max_tokens=200, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            first.set()
            pieces.extend(chunk.choices)
            got["usage"] = chunk.usage or got.get("usage")
        got["reason"] = pieces[-1].finish_reason

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60), "the stream did not start"
    process.send_signal(signal.SIGTERM)
    reader.join(120)
    assert got["reason"] == "length" and got["usage"].completion_tokens == 200  # drained, not cut
    # Then it exits: uvicorn (>= 0.29) re-raises the signal once drained, so the status is SIGTERM's (0 before).
    assert process.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):  # it is gone: nothing listens any more
        httpx.get(f"{url}/health", timeout=2)


def test_the_console_script_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["nanoflow-fx"].partition(":")
    assert module == nanoflow_fx.cli.__name__ and getattr(nanoflow_fx.cli, function) is nanoflow_fx.cli.main
    with pytest.raises(SystemExit) as info:
        nanoflow_fx.cli.main(["serve", "--help"])
    assert info.value.code == 0


def test_the_package_imports_no_server_package_and_names_the_extra() -> None:
    # Without the `serve` extra the package works (README's first set-up command installs no extras), and the
    # server says what to install.
    code = """
import sys
sys.modules["fastapi"] = None  # as if not installed: importing it raises ImportError
import nanoflow_fx, nanoflow_fx.optimize, nanoflow_fx.runtime.continuous, nanoflow_fx.cli
assert "uvicorn" not in sys.modules and "starlette" not in sys.modules
try:
    nanoflow_fx.serve
except ImportError as err:
    assert "nanoflow-fx[serve]" in str(err), err
else:
    raise AssertionError("nanoflow_fx.serve without FastAPI")
try:
    nanoflow_fx.cli.main(["serve", "some/model"])
except SystemExit as exit:
    assert "nanoflow-fx[serve]" in str(exit.code), exit.code
"""
    result = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

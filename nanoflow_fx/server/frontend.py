"""One HTTP process of `nanoflow_fx.serve` (started by `launch.HTTPProcesses`, not by users):

    python -m nanoflow_fx.server.frontend --pipe FD --socket FD

`--pipe`: its end of the pipe to the engine's process, which first sends the setup (the tokenizer, the served name,
the log level, the process's index); `--socket`: the listening socket, shared by every HTTP process. It serves
until SIGTERM (uvicorn drains its connections first) or until the engine's process goes away.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection

import uvicorn

from nanoflow_fx.server.app import build_app
from nanoflow_fx.server.bridge import RemoteBackend
from nanoflow_fx.server.generation import Generations


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--socket", type=int, required=True)
    args = parser.parse_args(argv)
    conn = Connection(args.pipe)
    try:
        setup = conn.recv()
    except EOFError:
        return 1  # the engine's process left before it could send the setup
    logging.basicConfig(level=setup["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s")
    backend = RemoteBackend(conn, prefix=f"srv{setup['index']}")
    app = build_app(Generations(backend, setup["tokenizer"]), setup["name"])
    # No limit on the graceful shutdown: SIGTERM waits for every request in flight (a second signal forces it).
    server = uvicorn.Server(uvicorn.Config(app, log_level=setup["log_level"], timeout_graceful_shutdown=None,
                                           backlog=setup["backlog"]))

    def gone() -> None:
        server.should_exit = True

    backend.on_gone = gone
    server.run(sockets=[socket.socket(fileno=args.socket)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

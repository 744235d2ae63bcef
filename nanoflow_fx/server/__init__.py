"""An OpenAI-compatible HTTP server on an optimized model (`pip install 'nanoflow-fx[serve]'`).

    nanoflow-fx serve MODEL_OR_PATH --port 8000          # the console script (nanoflow_fx.cli)
    nanoflow_fx.serve(model, tokenizer, port=8000)       # the same from Python (HTTP in a process of its own)
    app = nanoflow_fx.server.make_app(model, tokenizer)  # the FastAPI app, to run under any ASGI server

`/v1/completions` and `/v1/chat/completions` (streamed or not), `/v1/models`, `/health`: docs/serving.md.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as err:  # (the package itself needs neither: only the server does)
    raise ImportError(f"nanoflow_fx's server needs FastAPI and uvicorn ({err}); install them with "
                      "pip install 'nanoflow-fx[serve]'") from err

from nanoflow_fx.server.app import make_app
from nanoflow_fx.server.launch import HTTPProcesses, load, serve

__all__ = ["HTTPProcesses", "load", "make_app", "serve"]

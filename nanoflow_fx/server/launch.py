"""`serve`: load (or take) a model, optimize it, and serve it over HTTP with uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
from typing import Any

import torch
import uvicorn

from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.server.app import make_app

__all__ = ["load", "serve"]

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
          dtype: str = "auto", device: str | None = None, log_level: str = "info") -> None:
    """Serve `model` with OpenAI's API on `host`:`port` until SIGTERM or Ctrl-C, which stop taking connections,
    let the requests in flight finish, and return.

    `model`: a hub name or a local directory (loaded by `load` with `dtype`, `device` and `config`), or a model
    object, optimized here with `config` unless it already is (`tokenizer` is then needed). `model_name`: the name
    clients give as `model` (default: the name or path, else the model's `name_or_path`)."""
    if isinstance(model, str):
        model_name = model_name or model
        loaded, loaded_tokenizer = load(model, dtype, device, config)
        model, tokenizer = loaded, tokenizer if tokenizer is not None else loaded_tokenizer
    elif "nanoflow" not in model.__dict__:
        import nanoflow_fx

        model = nanoflow_fx.optimize(model, config)
    if tokenizer is None:
        raise ValueError("serve(model, tokenizer): a model object needs its tokenizer (AutoTokenizer.from_pretrained)")
    app = make_app(model, tokenizer, model_name)
    # No limit on the graceful shutdown: SIGTERM waits for every request in flight (a second signal forces it).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=None))
    server.run()

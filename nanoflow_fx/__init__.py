"""nanoflow_fx: NanoFlow-style nano-batching for any Hugging Face decoder, as a torch.compile / FX library.

    model = nanoflow_fx.optimize(hf_model)   # same object, accelerated in place
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)

`import nanoflow_fx` stays light: the config and the errors load at once; `optimize`, `backend`, `explain` and
`Explanation` (which import torch's compiler stack and transformers) load on first use, and `serve` (the
OpenAI-compatible server, `nanoflow_fx.server`: FastAPI and uvicorn, the `serve` extra) too.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from nanoflow_fx.config import ExperimentalConfig, NanoFlowConfig
from nanoflow_fx.errors import (
    CaptureMismatchError,
    InvalidInputError,
    KVCacheExhaustedError,
    NanoFlowError,
    RankDivergenceError,
    RequestTooLongError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from nanoflow_fx.explain import Explanation, explain
    from nanoflow_fx.optimize import backend, optimize
    from nanoflow_fx.server import serve

__version__ = "0.1.0"

__all__ = [
    "CaptureMismatchError",
    "InvalidInputError",
    "KVCacheExhaustedError",
    "Explanation",
    "ExperimentalConfig",
    "NanoFlowConfig",
    "NanoFlowError",
    "RankDivergenceError",
    "RequestTooLongError",
    "UnsupportedModelError",
    "backend",
    "explain",
    "optimize",
    "serve",
]

_LAZY = {"optimize": "nanoflow_fx.optimize", "backend": "nanoflow_fx.optimize",
         "explain": "nanoflow_fx.explain", "Explanation": "nanoflow_fx.explain", "serve": "nanoflow_fx.server"}


def __getattr__(name: str) -> Any:
    """Load the heavy public names on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'nanoflow_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package (`nanoflow_fx.optimize = <module>`); the public function
    of the same name must stay what `nanoflow_fx.optimize` and `nanoflow_fx.explain` are."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

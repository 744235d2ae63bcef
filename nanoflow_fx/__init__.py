"""nanoflow_fx: NanoFlow-style nano-batching for any Hugging Face decoder, as a torch.compile / FX library.

    model = nanoflow_fx.optimize(hf_model)   # same object, accelerated in place
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)
"""

from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.errors import (
    CaptureMismatchError,
    InvalidInputError,
    KVCacheExhaustedError,
    NanoFlowError,
    RequestTooLongError,
    UnsupportedModelError,
)
from nanoflow_fx.explain import Explanation, explain
from nanoflow_fx.optimize import backend, optimize

__version__ = "0.1.0"

__all__ = [
    "CaptureMismatchError",
    "InvalidInputError",
    "KVCacheExhaustedError",
    "Explanation",
    "NanoFlowConfig",
    "NanoFlowError",
    "RequestTooLongError",
    "UnsupportedModelError",
    "backend",
    "explain",
    "optimize",
]

"""Exceptions raised by nanoflow_fx. Each names what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "NanoFlowError",
    "UnsupportedModelError",
    "CaptureMismatchError",
    "RequestTooLongError",
    "KVCacheExhaustedError",
    "InvalidInputError",
    "RankDivergenceError",
]


class NanoFlowError(Exception):
    """Base class of every error nanoflow_fx raises on purpose."""


class UnsupportedModelError(NanoFlowError, TypeError):
    """The model is outside what nanoflow_fx can capture (the message says why)."""


class CaptureMismatchError(NanoFlowError, RuntimeError):
    """The captured step disagreed with the eager model on the probe input."""


class RequestTooLongError(NanoFlowError, ValueError):
    """A prompt (plus the tokens to generate) does not fit in `max_seq_len`."""


class KVCacheExhaustedError(NanoFlowError, RuntimeError):
    """The paged KV cache has too few free pages for the requests."""


class InvalidInputError(NanoFlowError, ValueError):
    """Inputs are malformed (e.g. an attention mask that does not match the input ids)."""


class RankDivergenceError(NanoFlowError, RuntimeError):
    """Tensor-parallel ranks disagreed on a step's plan (the message names the ranks and the difference)."""

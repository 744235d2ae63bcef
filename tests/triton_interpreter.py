"""Triton's interpreter for tests without a GPU (conftest sets TRITON_INTERPRET=1 before triton loads).

This module mends one interpreter bug: with NumPy 2.x, using a loaded scalar as a `range` bound fails, because
the interpreter turns it into an int with `int(array)` on a 1-element array; `.item()` works on both.
"""

from __future__ import annotations

import importlib.util
import os

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime import interpreter

        _original = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            _original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = _patch_lang_tensor

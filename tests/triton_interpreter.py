"""Triton's interpreter for tests without a GPU (conftest sets TRITON_INTERPRET=1 before triton loads).

This module mends two interpreter bugs: with NumPy 2.x, using a loaded scalar as a `range` bound fails, because
the interpreter turns it into an int with `int(array)` on a 1-element array; `.item()` works on both. And its
conversion of floats to e4m3 rounds ties away from zero and flushes e4m3's subnormals to zero, where the GPU's
conversion (`cvt.rn`) and torch's round to nearest even and keep subnormals: conversions to e4m3 go through torch's
(values beyond +-448 are never converted: the kernels clamp first).
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

        import numpy as np
        import torch
        import triton.language as tl

        _convert_float = interpreter._convert_float

        def _convert_float_rne(input, input_dtype, output_dtype, rounding_mode):  # type: ignore[no-untyped-def]
            if output_dtype == tl.float8e4nv and input_dtype in (tl.float32, tl.float16):
                values = torch.from_numpy(np.ascontiguousarray(input).astype(np.float32))
                return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
            return _convert_float(input, input_dtype, output_dtype, rounding_mode)

        interpreter._convert_float = _convert_float_rne

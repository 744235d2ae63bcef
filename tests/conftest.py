"""Test session setup: environment variables read at import, and the CUDA tests skipped without a GPU.

The shared helpers (optimized models, references, inputs) are in tests/helpers.py; the ones many test modules
import from here are re-exported.
"""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in Triton's interpreter. This must be set before anything imports triton
# (torch may, at import), since triton's own library functions are decorated then.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every test traces its model: a step saved by an earlier test (or run) would be loaded instead, and tests that
# read the captured graph would see none. tests/test_store.py turns saving on where it tests it.
os.environ["NANOFLOW_FX_SAVE_STEP"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import ALL_FAMILIES, DEFAULT_CONFIG, DEVICES, optimized, reference  # noqa: E402

__all__ = ["ALL_FAMILIES", "DEFAULT_CONFIG", "DEVICES", "optimized", "reference"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

"""Shared fixtures: optimized tiny models are built once per (family, config) and reused across tests."""

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

import nanoflow_fx  # noqa: E402
from tests.tiny_models import FAMILIES, build  # noqa: E402

_CACHE: dict[tuple[str, nanoflow_fx.NanoFlowConfig, str], torch.nn.Module] = {}

# num_pages given: on CUDA the default sizes the cache from free GPU memory, which would leave none for the
# next model the tests build in the same process.
DEFAULT_CONFIG = nanoflow_fx.NanoFlowConfig(max_batch_size=8, max_seq_len=96, page_size=4, num_pages=192)


def optimized(family: str, config: nanoflow_fx.NanoFlowConfig = DEFAULT_CONFIG, device: str = "cpu") -> torch.nn.Module:
    """An optimized tiny model of `family` (seed 0), shared by every test that asks for the same one.

    Tests must not change it; they may run it (the KV cache pages are released after each call).
    """
    key = (family, config, device)
    if key not in _CACHE:
        _CACHE[key] = nanoflow_fx.optimize(build(family, device=device), config)
    return _CACHE[key]


def reference(family: str, device: str = "cpu") -> torch.nn.Module:
    """The same weights (seed 0) as `optimized(family)`, left as HF built it (eager attention)."""
    return build(family, device=device)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


ALL_FAMILIES = sorted(FAMILIES)
# Tests that take a `device` run on the CPU always and on CUDA under `pytest -m cuda` on a GPU machine.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

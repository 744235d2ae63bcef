"""Shared test helpers: tiny optimized models (built once per process), their HF references, inputs, greedy
sampling parameters, and the checks that an engine holds nothing after its requests ended.

`optimize()` traces the model with Dynamo (about 2 s for a tiny model on a CPU): most of the suite's time. Tests
that only run a model share one per (family, config) through `optimized`; a test that changes its model makes
its own (`fresh`). Outside the 8-family parity matrices (test_generate_parity.py and the step properties), tests
that need a real model run `CORE_FAMILIES` (distinct code paths); tests of the engine's bookkeeping need no model at
all (tests/echo_runner.py).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import pytest
import torch
import transformers as tf

import nanoflow_fx
from nanoflow_fx.runtime import Engine
from nanoflow_fx.runtime.sampling import SamplingParams
from tests.tiny_models import FAMILIES, VOCAB, build

ALL_FAMILIES = sorted(FAMILIES)
# Dense GQA (llama); soft-capping with alternating sliding-window and global layers (gemma2); mixture of experts
# (mixtral): the model families that tests outside the parity matrices run.
CORE_FAMILIES = ["llama", "gemma2", "mixtral"]
# Tests that take a `device` run on the CPU always and on CUDA under `pytest -m cuda` on a GPU machine.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

PAD = 0
NO_EOS = VOCAB + 1  # an id no model samples: generation runs to max_new_tokens

# num_pages given: on CUDA the default sizes the cache from free GPU memory, which would leave none for the
# next model the tests build in the same process.
DEFAULT_CONFIG = nanoflow_fx.NanoFlowConfig(max_batch_size=8, max_seq_len=96, page_size=4, num_pages=192)

_CACHE: dict[tuple[str, nanoflow_fx.NanoFlowConfig, str], torch.nn.Module] = {}


def optimized(family: str, config: nanoflow_fx.NanoFlowConfig = DEFAULT_CONFIG, device: str = "cpu") -> torch.nn.Module:
    """An optimized tiny model of `family` (seed 0), shared by every test that asks for the same one.

    Tests must not change it; they may run it (the KV cache pages are released after each call).
    """
    key = (family, config, device)
    if key not in _CACHE:
        _CACHE[key] = nanoflow_fx.optimize(build(family, device=device), config)
    return _CACHE[key]


def fresh(family: str = "llama", **changes: object) -> torch.nn.Module:
    """A model of its own (for a test that changes it), optimized with the default config plus `changes`."""
    return nanoflow_fx.optimize(build(family), dataclasses.replace(DEFAULT_CONFIG, **changes))


def reference(family: str, device: str = "cpu") -> torch.nn.Module:
    """The same weights (seed 0) as `optimized(family)`, left as HF built it (eager attention)."""
    return build(family, device=device)


def left_padded_batch(lengths: Sequence[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of `lengths` (token ids >= 3), left-padded with PAD into one batch, and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@functools.lru_cache(maxsize=4096)
def hf_greedy(family: str, prompt: tuple[int, ...], max_new_tokens: int, eos: int | None = None) -> tuple[int, ...]:
    """HF eager greedy `generate()` of one prompt alone: its new tokens, up to and including an `eos`."""
    out = reference(family).generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=NO_EOS if eos is None else eos, pad_token_id=PAD)
    new = out[0, len(prompt) :].tolist()
    return tuple(new[: new.index(eos) + 1] if eos is not None and eos in new else new)


def greedy(eos: int | None = None) -> SamplingParams:
    """Greedy decoding that stops at `eos` (None: runs to max_new_tokens)."""
    return SamplingParams(False, 1.0, 0, 1.0, (eos,) if eos is not None else (), 0)


def assert_nothing_held(engine: Engine) -> None:
    """Every KV page and request slot is free, and no request is queued or running."""
    allocator = engine.kv_cache.allocator
    assert allocator.num_free == allocator.num_pages, f"{allocator.num_pages - allocator.num_free} pages held"
    assert sorted(engine.free_slots) == list(range(engine.runner.num_slots)), "slots held"
    assert not engine.running and not engine.waiting and not engine._inbox


def wait_until_nothing_held(engine: Engine, timeout: float = 10.0) -> None:
    """`assert_nothing_held`, once it holds (requests another thread ends, e.g. a server's), within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_nothing_held(engine)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class BatchMixingLlama(tf.LlamaForCausalLM):
    """A llama whose forward mixes information across tokens outside attention: the packed step cannot reproduce
    it, so `optimize()` must refuse it (its capture check)."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + out.logits.mean(dim=1, keepdim=True)
        return out

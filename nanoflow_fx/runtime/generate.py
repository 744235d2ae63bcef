"""`generate()` on the fast path: HF's contract (arguments and outputs), nanoflow's paged, packed steps.

Options the fast path does not implement run through HF's own `generate()` instead (still correct, since the
optimized model's plain forward is HF's eager attention), with one log line naming the option.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from nanoflow_fx.errors import InvalidInputError
from nanoflow_fx.runtime.engine import Engine
from nanoflow_fx.runtime.requests import Request
from nanoflow_fx.runtime.sampling import SamplingParams

__all__ = ["GenerationPlan", "plan_generation", "run_generation"]

log = logging.getLogger(__name__)

# Generation options the fast path implements, and options that cannot change its output.
_HANDLED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "return_dict_in_generate",
}
_NO_EFFECT = {
    "bos_token_id", "use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile",
    "transformers_version", "_from_model_config", "_commit_hash", "generation_kwargs",
}
_MODEL_KWARGS = {"attention_mask", "use_cache"}


@dataclass(frozen=True)
class GenerationPlan:
    """A validated fast-path generate call."""

    input_ids: torch.Tensor  # [B, L], as given (left padding kept)
    prompts: list[list[int]]  # each row's real tokens
    max_new_tokens: int
    sampling: SamplingParams
    pad_token_id: int | None
    return_dict: bool


def plan_generation(
    model: Any, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> GenerationPlan | str:
    """Return the plan, or the reason the fast path does not apply (then HF's generate runs)."""
    default_max_length = (  # HF's own test: no max_length from the caller, the config or the model
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor):
        return "no input_ids tensor was given"
    for key, value in model_kwargs.items():
        if key not in _MODEL_KWARGS and value is not None:
            return f"the option `{key}` is not on the fast path"
    unsupported = _unsupported_options(gen)
    if unsupported:
        return f"the option `{unsupported}` is not on the fast path"
    mask = _attention_mask(input_ids, model_kwargs.get("attention_mask"), gen)
    eos = _as_ids(gen.eos_token_id)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else None)
    max_new = _max_new_tokens(model, gen, input_ids.shape[1], default_max_length)
    min_new = max(gen.min_new_tokens or 0, (gen.min_length or 0) - input_ids.shape[1])
    sampling = SamplingParams(
        do_sample=bool(gen.do_sample), temperature=float(gen.temperature), top_k=int(gen.top_k or 0),
        top_p=float(gen.top_p), eos_token_ids=tuple(eos), min_new_tokens=max(min_new, 0),
    )
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    return GenerationPlan(input_ids, prompts, max_new, sampling, pad, bool(gen.return_dict_in_generate))


def run_generation(engine: Engine, plan: GenerationPlan) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Generate with `engine` and shape the result exactly as HF's `generate()` does.

    Every row becomes a request of the engine, so a batch larger than what fits at once runs through the same
    scheduler (continuous batching), and calls from several threads share the engine's steps.
    """
    plane = engine.plane
    if plane is not None and not plane.is_driver:  # (tensor parallelism: rank 0's requests, mirrored)
        requests = plane.follow(engine)
    else:
        requests = _run_requests(engine, plan)
    failed = next((r for r in requests if r.error is not None), None)
    if failed is not None:
        raise RuntimeError(f"nanoflow_fx: generation failed: {failed.error}")
    width = max(len(r.output) for r in requests)
    pad = plan.pad_token_id if plan.pad_token_id is not None else 0
    new = torch.tensor([r.output + [pad] * (width - len(r.output)) for r in requests], dtype=torch.int64)
    sequences = torch.cat([plan.input_ids.to(torch.int64), new.to(plan.input_ids.device)], dim=1)
    # (transformers annotates `sequences` with the legacy LongTensor class; this is an int64 tensor)
    return GenerateDecoderOnlyOutput(sequences=cast(torch.LongTensor, sequences)) if plan.return_dict else sequences


def _run_requests(engine: Engine, plan: GenerationPlan) -> list[Request]:
    """Queue the plan's rows and step until they finish (under tensor parallelism, as rank 0: the session then
    ends for the other ranks, `ControlPlane.end_session`)."""
    requests: list[Request] = []
    error: BaseException | None = None
    stepped = False
    try:  # a row the engine refuses raises before any step runs: the rows queued before it are cancelled
        for i, prompt in enumerate(plan.prompts):
            requests.append(engine.add_request(prompt, plan.sampling, plan.max_new_tokens, name=f"sequence {i}"))
        stepped = True  # (a step's failure is every rank's: no rank waits for the session's end)
        engine.run_until_done(requests)
        stepped = False
    except BaseException as err:
        error = err
        raise
    finally:
        for req in requests:
            engine.cancel(req)  # a no-op for finished requests; frees the others' pages after an error
        if engine.plane is not None and not stepped:
            engine.plane.end_session(engine, error)
    return requests


def _unsupported_options(gen: GenerationConfig, also_handled: Collection[str] = ()) -> str | None:
    """The first option of `gen` set to a value the fast path does not implement (None if there is none);
    `also_handled`: options a caller implements beyond `generate()`'s (the continuous-batching manager)."""
    defaults = GenerationConfig._get_default_generation_params()
    for key, value in gen.to_dict().items():
        if key in _HANDLED or key in _NO_EFFECT or key in also_handled:
            continue
        default = defaults.get(key)
        unset = value is None or (value in (False, {}) and default in (None, False))  # None: the default applies
        if value != default and not unset:
            return key
    if gen.do_sample is not True and gen.do_sample not in (False, None):
        return "do_sample"
    return None


def _attention_mask(input_ids: torch.Tensor, mask: torch.Tensor | None, gen: GenerationConfig) -> torch.Tensor:
    """The rows' mask, given or inferred from `pad_token_id` as HF infers it; either way it must be left
    padding with at least one real token per row."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"input_ids must be an integer tensor [batch, seq_len], got {input_ids.dtype} "
                                f"{tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise InvalidInputError("input_ids has no rows: give at least one prompt")
    if input_ids.shape[1] == 0:
        raise InvalidInputError("input_ids is empty: give at least one prompt token per sequence")
    if mask is None:
        pad, eos = gen.pad_token_id, _as_ids(gen.eos_token_id)
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            mask, source = input_ids != pad, f"inferred from pad_token_id={pad}"  # as HF infers it
        else:
            return torch.ones_like(input_ids, dtype=torch.bool)
    else:
        source = "attention_mask"
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidInputError(
                f"attention_mask has shape {shape} but input_ids has shape {tuple(input_ids.shape)}; "
                "pass the mask the tokenizer returned with these input_ids"
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InvalidInputError("attention_mask must hold only 0 and 1")
    mask = mask.to(input_ids.device).bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"rows {empty} have no tokens ({source} marks them all padding); give every row at "
                                "least one prompt token")
    # Left padding: once a row's tokens start, they run to the end (no 0 after a 1).
    right = (mask.int().cummax(dim=1).values.bool() & ~mask).any(dim=1).nonzero().flatten().tolist()
    if right:
        raise InvalidInputError(
            f"rows {right} have padding after their tokens ({source}); decoder-only generation needs left padding: "
            "set tokenizer.padding_side = 'left'"
        )
    return mask


def _max_new_tokens(model: Any, gen: GenerationConfig, input_len: int, default_max_length: bool,
                    max_new_tokens: float | None = None) -> int:
    """HF's number of new tokens: `max_new_tokens` (a per-request value; else the config's) rounded up, else
    what `max_length` leaves after the prompt; raises if that is nothing."""
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens
    if max_new_tokens is not None:
        max_new = max_new_tokens
    else:
        max_length = gen.max_length
        if default_max_length:  # HF's default: 20 new tokens, capped by the model's positions
            limit = getattr(model.config, "max_position_embeddings", None)
            max_length = min(gen.max_length + input_len, limit) if limit else gen.max_length + input_len
        max_new = max_length - input_len
    if max_new <= 0:
        raise InvalidInputError(
            f"nothing to generate: input length {input_len} leaves {max_new} new tokens; raise max_new_tokens "
            "(or max_length)"
        )
    return math.ceil(max_new)  # HF's loop runs while the length is below max_length: 2.5 new tokens give 3


def _as_ids(value: int | list[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]

"""A tiny Llama trained on real text, for accuracy checks that mean something without downloaded weights.

Random weights give near-flat next-token distributions, so a lossy arithmetic (FP8 linears, an FP8 KV cache)
barely changes a random model's perplexity or greedy tokens whatever its error. This model is trained here, in
process, on text that ships with Python (its standard library's sources), byte by byte, until its distributions
are peaked as a real model's are; then the perplexity and next-token agreement of an optimized model on held-out
text, against the plain model's, measure what an arithmetic costs.

`trained_llama()` trains it (seeded; 300 steps, about 180 CPU-seconds: some 1.5 minutes on two idle cores) or loads
it from the cache (`$XDG_CACHE_HOME/nanoflow_fx/tests`, else ~/.cache/...), keyed by the recipe; a file lock makes
concurrent test workers train it once. `heldout_windows()` is the evaluation text; `evaluate()` the teacher-forced
comparison.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

__all__ = ["RECIPE", "Agreement", "evaluate", "heldout_windows", "teacher_forced_logits", "trained_llama"]


@dataclass(frozen=True)
class Recipe:
    """Everything the trained weights depend on (the cache key)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    window: int = 64  # bytes per training sequence
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    train_bytes: int = 3_000_000
    heldout_every: int = 10  # every 10th standard-library file (sorted by name) is held out

    def config(self) -> tf.LlamaConfig:
        return tf.LlamaConfig(vocab_size=256, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                              num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                              num_key_value_heads=self.num_key_value_heads, max_position_embeddings=2 * self.window,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

    def key(self) -> str:
        parts = dict(dataclasses.asdict(self), python=sys.version_info[:2], torch=torch.__version__.split("+")[0],
                     files=[p.name for p in _sources()])
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


RECIPE = Recipe()


def _sources() -> list[Path]:
    """The standard library's top-level .py files, sorted (the same list wherever this Python is installed)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _text(heldout: bool, recipe: Recipe = RECIPE) -> bytes:
    files = [p for i, p in enumerate(_sources()) if (i % recipe.heldout_every == recipe.heldout_every - 1) == heldout]
    return b"\n".join(p.read_bytes() for p in files)


def heldout_windows(count: int = 24, length: int = RECIPE.window, recipe: Recipe = RECIPE) -> list[list[int]]:
    """`count` windows of `length` bytes of held-out text, evenly spaced through it."""
    text = _text(heldout=True, recipe=recipe)
    stride = (len(text) - length) // count
    return [list(text[i * stride : i * stride + length]) for i in range(count)]


def _cache_path(recipe: Recipe) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "nanoflow_fx" / "tests" / f"trained_llama_{recipe.key()}.pt"


def trained_llama(recipe: Recipe = RECIPE) -> tf.LlamaForCausalLM:
    """The trained model (fp32, eval mode, eager attention): loaded from the cache, else trained and cached."""
    path = _cache_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker trains; the others wait and load
        if not path.exists():
            state = _train(recipe)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
    model = tf.LlamaForCausalLM(recipe.config())
    model.load_state_dict(torch.load(path, weights_only=True))
    model.set_attn_implementation("eager")
    return model.eval()


def _train(recipe: Recipe) -> dict[str, torch.Tensor]:
    torch.manual_seed(recipe.seed)
    model = tf.LlamaForCausalLM(recipe.config())
    model.set_attn_implementation("sdpa")
    model.train()
    data = torch.frombuffer(bytearray(_text(heldout=False, recipe=recipe)[: recipe.train_bytes]), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.perf_counter()
    for step in range(recipe.steps):
        warm = min(1.0, (step + 1) / recipe.warmup)
        for group in opt.param_groups:  # warmup, then cosine decay to a tenth
            group["lr"] = recipe.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / recipe.steps)))
        starts = torch.randint(0, len(data) - recipe.window - 1, (recipe.batch,), generator=gen)
        batch = torch.stack([data[s : s + recipe.window] for s in starts.tolist()]).long()
        loss = model(input_ids=batch, labels=batch).loss  # (HF shifts the labels: next-byte loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"trained_llama: {recipe.steps} steps in {time.perf_counter() - start:.0f} s, last loss {loss.item():.3f}",
          file=sys.stderr)
    return model.state_dict()


@dataclass(frozen=True)
class Agreement:
    """Teacher-forced comparison of an optimized model with the plain one on the same windows."""

    perplexity: float  # of the optimized model, per byte
    reference_perplexity: float  # of the plain model
    agreement: float  # share of positions whose most likely next byte is the plain model's

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


def teacher_forced_logits(model: torch.nn.Module, windows: Sequence[Sequence[int]], per_step: int = 4) -> torch.Tensor:
    """Logits [windows, length, 256] of an optimized model's captured step (its step runner, as the engine runs
    prefills), `per_step` windows packed per step."""
    rows = []
    for i in range(0, len(windows), per_step):
        group = windows[i : i + per_step]
        logits = model.nanoflow.runner.run_prompts(group, all_logits=True).float()
        rows.extend(logits.split([len(w) for w in group]))
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model: torch.nn.Module, reference: torch.nn.Module, windows: Sequence[Sequence[int]]) -> Agreement:
    """Perplexity (next byte, teacher-forced) of `model` (optimized) and of `reference` (plain) on `windows`, and
    how often their most likely next bytes agree."""
    got = teacher_forced_logits(model, windows)
    want = reference(torch.tensor(windows)).logits.float()
    targets = torch.tensor(windows)[:, 1:]

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten()).item())

    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return Agreement(ppl(got), ppl(want), agree)

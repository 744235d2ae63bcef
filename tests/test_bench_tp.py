"""`benchmarks/bench_tp.py` runs end to end under torchrun: 2 gloo ranks on the CPU (a tiny model), and a world of
one on NCCL (CUDA); its JSON holds every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, ranks: int, *args: str) -> dict:
    out = tmp_path / "bench_tp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "benchmarks.bench_tp", "--model", "tiny", "--workload", "48x8", "--requests", "4",
           "--hf-requests", "2", "--step-tokens", "64", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _all_reduces() -> int:
    """The tiny model's all-reduces per step: one after o_proj and one after down_proj in each of its 4 layers, and
    the embedding's where transformers' TP plan makes it vocabulary-parallel (its newer releases do)."""
    from benchmarks.common import build_model

    model = build_model("tiny", "meta", torch.float32)
    plan = getattr(model, "tp_plan", None) or model._tp_plan
    return 2 * model.config.num_hidden_layers + (plan.get("model.embed_tokens") == "embedding_rowwise")


def _check(result: dict, world: int, sizes: list[int], cuts: set[str]) -> None:
    assert result["meta"]["world_size"] == world
    assert [r["bytes"] for r in result["all_reduce"]] == sizes
    assert all(r["ms"] > 0 and r["bus_gbps"] >= 0 for r in result["all_reduce"])
    assert {r["cut"] for r in result["step"]} == cuts
    assert all(r["tokens"] == 64 and r["ms"] > 0 and r["all_reduces"] == _all_reduces() for r in result["step"])
    for row in ("transformers", "engine"):
        assert result[row]["output_tok_s"] > 0
    assert result["engine"]["requests"] == 4 and result["transformers"]["requests"] == 2
    assert set(result["ratios"]) == {"engine_over_transformers"} | {f"step64 {c} / unsplit" for c in cuts - {"unsplit"}}


def test_bench_tp_on_two_gloo_ranks(tmp_path: Path) -> None:
    result = _bench(tmp_path, 2, "--device", "cpu", "--sizes", "16384", "65536",
                    "--hf-cb-config", '{"num_blocks": 16, "max_batch_tokens": 128, "page_size": 16}',
                    "--config", '{"max_num_tokens": 128}')
    _check(result, 2, [16384, 65536], {"unsplit", "0.5 off"})


@pytest.mark.cuda
def test_bench_tp_world_of_one_on_nccl(tmp_path: Path) -> None:
    result = _bench(tmp_path, 1, "--device", "cuda", "--sizes", "16384", "33554432")
    _check(result, 1, [16384, 33554432], {"unsplit", "0.5 off", "0.5 streams"})

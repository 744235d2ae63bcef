"""Tensor parallelism: every rank runs this script; transformers loads its shard, nanoflow_fx serves it.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                            # tiny Llama, CPU, gloo
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --checkpoint PATH          # a real checkpoint
    torchrun --nproc-per-node 8 examples/tensor_parallel.py --device cuda --model llama3-70b  # random bf16, NCCL
    torchrun --nproc-per-node 4 examples/tensor_parallel.py --tp 2          # 2 data-parallel replicas of TP 2

On the CPU, rank 0 saves a tiny random Llama (no downloads) and every rank loads it with transformers' own TP
(`from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`). With `--device cuda` and no checkpoint,
each rank builds its shard of the 8B or 70B shape on the meta device and fills it with random bf16 weights.
With `--tp T` below the world size, the world is a (world / T, T) device mesh: each TP group a data-parallel
replica with its own engine, the model sharded over the mesh's "tp" dimension (`distribute_by_plan`: transformers'
own TP loading shards over the whole world); `generate_batch` shares the prompts out over the replicas. Every rank
makes the same calls with the same prompts (under TP alone rank 0's run and the others' are not read); every rank
returns every result. Output is printed by rank 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.distributed import DistributedConfig

import nanoflow_fx
from nanoflow_fx.capture.tensor_parallel import distribute_by_plan, localize

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
}


def load_checkpoint(path: str, dtype: torch.dtype, mesh: Any = None) -> torch.nn.Module:
    """This rank's shard of every planned weight: transformers' own TP loading over the whole world, or (several
    replicas) the whole checkpoint sharded over the mesh's "tp" dimension."""
    if mesh is None:
        tp = DistributedConfig(tp_size=dist.get_world_size())
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, distributed_config=tp).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return distribute_by_plan(model, mesh["tp"])


def tiny_checkpoint() -> str:
    """Rank 0 saves a tiny random Llama; every rank gets its path."""
    path = [tempfile.mkdtemp(prefix="nanoflow_tp_") if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES["tiny"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return str(path[0])


def random_shard(shape: str, device: str, dtype: torch.dtype, mesh: Any = None) -> torch.nn.Module:
    """This rank's shard of `shape` with random weights, never holding the whole model: built on the meta
    device, sharded as transformers' plan shards a checkpoint, then materialized."""
    from torch.distributed.device_mesh import init_device_mesh

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype).eval()
    distribute_by_plan(model, mesh["tp"] if mesh is not None else init_device_mesh(device, (dist.get_world_size(),)))
    localize(model)  # (plain local shards: `optimize()` would do it too)
    model.to_empty(device=device)
    torch.manual_seed(0)  # (the same draws on every rank: replicated weights agree)
    for name, param in model.named_parameters():
        with torch.no_grad():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    with torch.device(device):  # (its buffers are not parameters; transformers 5.25 takes no `device=`)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: random weights)")
    parser.add_argument("--model", default=None, choices=sorted(SHAPES), help="default: tiny on CPU, 8B on CUDA")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tp", type=int, default=None, help="TP group size (default: the world; less: replicas)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(message)s")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, dtype = dist.get_rank(), torch.float32 if args.device == "cpu" else torch.bfloat16
    shape = args.model or ("tiny" if args.device == "cpu" else "llama3-8b")
    world, tp_size = dist.get_world_size(), args.tp or dist.get_world_size()
    if world % tp_size:
        raise SystemExit(f"--tp {tp_size} does not divide the world of {world} ranks")
    mesh = None
    if tp_size < world:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(args.device, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))

    if args.checkpoint or args.device == "cpu":
        model = load_checkpoint(args.checkpoint or tiny_checkpoint(), dtype, mesh)
    else:
        model = random_shard(shape, args.device, dtype, mesh)
    start = time.perf_counter()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig(max_batch_size=max(args.batch_size, 2),
                                                           max_seq_len=args.prompt_len + args.max_new_tokens))
    optimize_s = time.perf_counter() - start

    torch.manual_seed(1)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch_size, args.prompt_len))
    out = model.generate(prompts.to(args.device), max_new_tokens=args.max_new_tokens, do_sample=False)
    start = time.perf_counter()
    results = model.generate_batch(prompts.tolist(), max_new_tokens=args.max_new_tokens, do_sample=False)
    batch_s = time.perf_counter() - start
    if rank == 0:
        tp, replicas = model.nanoflow.tensor_parallel, model.nanoflow.replicas
        print(f"rank 0 of TP {tp.world_size} x {replicas.count if replicas else 1} replicas: "
              f"{shape if not args.checkpoint else args.checkpoint} on {args.device}, optimize() {optimize_s:.1f} s, "
              f"{len(model.nanoflow.layers)} attention layers of {model.nanoflow.layers[0].num_kv_heads} KV heads on "
              "this rank")
        print(f"generate(): sequence 0 new tokens {out[0, args.prompt_len:].tolist()}")
        tokens = sum(len(r.generated_tokens) for r in results.values())
        print(f"generate_batch(): {len(results)} requests, {tokens} tokens in {batch_s:.2f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

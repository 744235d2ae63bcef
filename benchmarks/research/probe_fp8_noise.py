"""Is an FP8 step's distance from the eager FP8 model a fault, or e4m3's rounding noise carried on by depth?

    python3 -m benchmarks.research.probe_fp8_noise [--layers 1 2 8 32] [--out fp8_noise.json]

For random-weight models of the 8B shape cut to a few layer counts (and the tiny shape in fp32), the teacher-forced
logits of a few prompts under:
  plain_fp32 / plain     the model without FP8, in fp32 and in the model's dtype (eager);
  fq_fp32                the same weights with every linear but the LM head fake-quantised in fp32 (weights per
                         output channel, inputs per token: amax / 448, e4m3 round trip): FP8's exact arithmetic;
  fq                     the eager model after `optimize()` (its FP8 linears compute `nanoflow::fp8_linear`'s
                         reference in the model's dtype): what the capture check compares with;
  engine / engine_slow   the captured step (fast accumulation on / off), no capture check.
Each pair's distance is the capture check's measure (the largest token row's RMS difference relative to that row's
RMS logit) and the mean cosine similarity. Two correct FP8 computations that round differently anywhere differ by
e4m3's noise carried through the layers: if engine-vs-fq is about fq-vs-fq_fp32 at every depth, the step has no
fault; a fault shows at one layer already.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from typing import Any

import torch
import torch.nn.functional as F

import nanoflow_fx
from benchmarks.common import SHAPES, build_model
from nanoflow_fx.capture import lowering


def fake_quant(t: torch.Tensor) -> torch.Tensor:
    s = (t.abs().amax(-1, keepdim=True).float() / 448).clamp(min=torch.finfo(torch.float32).tiny)
    return (t.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def fake_quantise(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings()
    for m in model.modules():
        if type(m) is torch.nn.Linear and m is not head:
            m.weight.data = fake_quant(m.weight.data).to(m.weight.dtype)
            m.register_forward_pre_hook(lambda _, args: (fake_quant(args[0]).to(args[0].dtype), *args[1:]))
    return model


@torch.no_grad()
def eager(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(torch.tensor([p], device=dev), use_cache=False).logits[0].float() for p in prompts])


def distance(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    rows = (a - b).pow(2).mean(-1).sqrt() / b.pow(2).mean(-1).sqrt().clamp(min=1e-6)
    return dict(row_rms_max=rows.max().item(), row_rms_mean=rows.mean().item(),
                cosine_mean=F.cosine_similarity(a, b, dim=-1).mean().item(),
                top1=(a.argmax(-1) == b.argmax(-1)).float().mean().item())


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_logits(model: torch.nn.Module, prompts: list[list[int]], fast: bool) -> torch.Tensor:
    lowering.FP8_FAST_ACCUM = fast
    try:
        config = nanoflow_fx.NanoFlowConfig(linear_dtype="fp8_e4m3", check_capture=False, cuda_graphs=False,
                                            save_step=False, max_batch_size=8, page_size=16, num_pages=64,
                                            max_num_tokens=512)
        nanoflow_fx.optimize(model, config)
        return model.nanoflow.runner.run_prompts(prompts, all_logits=True).float()
    finally:
        lowering.FP8_FAST_ACCUM = True


def probe(shape: str, layers: int, dtype: torch.dtype, prompt_lens: list[int], device: str) -> dict[str, Any]:
    torch.manual_seed(0)
    SHAPES["_probe"] = {**SHAPES[shape], "num_hidden_layers": layers}
    try:
        model = build_model("_probe", device, dtype)
    finally:
        del SHAPES["_probe"]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    out: dict[str, torch.Tensor] = {"plain": eager(model, prompts)}
    ref = copy.deepcopy(model).float()
    out["plain_fp32"] = eager(ref, prompts)
    out["fq_fp32"] = eager(fake_quantise(ref), prompts)
    del ref
    _empty_cache()
    slow_model = copy.deepcopy(model)
    out["engine"] = engine_logits(model, prompts, fast=True)
    out["fq"] = eager(model, prompts)
    del model
    _empty_cache()
    out["engine_slow"] = engine_logits(slow_model, prompts, fast=False)
    del slow_model
    _empty_cache()
    pairs = [("plain", "plain_fp32"), ("fq_fp32", "plain_fp32"), ("fq", "fq_fp32"), ("engine", "fq"),
             ("engine_slow", "fq"), ("engine", "fq_fp32"), ("engine_slow", "fq_fp32"), ("engine", "engine_slow"),
             ("engine", "plain")]
    result = {f"{a} vs {b}": distance(out[a], out[b]) for a, b in pairs}
    print(f"{shape} x {layers} layers, {dtype}:", flush=True)
    for name, d in result.items():
        print(f"  {name:<26} row RMS max {d['row_rms_max']:.4f} mean {d['row_rms_mean']:.4f}  "
              f"cosine {d['cosine_mean']:.5f}  top-1 {d['top1']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="fp8_noise.json")
    args = parser.parse_args()
    results: dict[str, Any] = dict(date=str(datetime.date.today()), torch=torch.__version__,
                                   device=torch.cuda.get_device_name() if args.device == "cuda" else args.device)
    results["tiny fp32"] = probe("tiny", 4, torch.float32, [9, 5, 12], args.device)
    for layers in args.layers if args.device == "cuda" else []:
        results[f"llama3-8b x {layers}"] = probe("llama3-8b", layers, torch.bfloat16, [64, 37], args.device)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Time from `optimize()` to the first generated token on a Llama-3-8B-shaped model (random bf16 weights), in a
fresh process with the on-disk caches as they are, then again in a second fresh process (caches now warm).

    python3 -m benchmarks.first_token [--config '{"max_num_tokens": 2048}'] [--out first_token.json]

Each run prints `optimize()`'s breakdown (`model.nanoflow.timings`) and the first generate call (1 prompt of 128
tokens, 1 new token). Then, whether or not the first steps ran on the interim kernel
(`NanoFlowConfig.interim_attention`), 32 more tokens are generated at once (`after_first_32_tokens_s`: on the
interim kernel if the attention backend is still being built), the backend's build is waited for, and 32 tokens
are generated again (`ready_32_tokens_s`; the switch to the backend, if still due, happens at its first step and is
reported in `timings` as `attention_switch_s` / `attention_switch_cost_s`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the child processes run `-m benchmarks.first_token` from here


def one_run(config: str) -> dict:
    start = time.perf_counter()
    import torch

    import nanoflow_fx
    from benchmarks.common import build_model

    imported = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    built = time.perf_counter()
    nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig.from_dict(json.loads(config)))
    optimized = time.perf_counter()
    ids = torch.randint(3, model.config.vocab_size, (1, 128), device="cuda")
    out = model.generate(ids, max_new_tokens=1, do_sample=False)
    out.tolist()
    done = time.perf_counter()
    interim_after_first = model.nanoflow.runner.interim is not None
    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist()
    more = time.perf_counter()
    if model.nanoflow.attention_ready is not None:
        model.nanoflow.attention_ready.wait()
    ready = time.perf_counter()
    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False).tolist()
    again = time.perf_counter()
    return dict(import_s=imported - start, build_model_s=built - imported, optimize_s=optimized - built,
                first_generate_s=done - optimized, optimize_to_first_token_s=done - built,
                interim_after_first_token=interim_after_first, after_first_32_tokens_s=more - done,
                wait_for_backend_s=ready - more, ready_32_tokens_s=again - ready,
                interim_at_end=model.nanoflow.runner.interim is not None,
                cuda_graphs=model.nanoflow.runner.cuda_graphs is not None,
                timings=model.nanoflow.timings, config=model.nanoflow.config.to_dict(),
                step_loaded=model.nanoflow.step_fn.loaded is not None,
                step_replicated=model.nanoflow.step_fn.replicated is not None,
                attention_backend=model.nanoflow.attention_backend.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--out", default="first_token.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.config)))
        return
    runs = []
    for label in ("first process (caches as found)", "second process (caches warm)"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.first_token", "--child", "--config", args.config],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-6000:])
            raise SystemExit(f"{label}: failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["run"] = label
        runs.append(result)
        print(f"[measured] {result}", flush=True)
        Path(args.out).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

"""`num_nanobatches="auto"` on a Llama-3-8B-shaped model (random bf16 weights): how long its schedule search takes,
what it predicted and measured, and the same again with its cost table kept on disk.

    python3 -m benchmarks.research.bench_auto [--config '{"max_num_tokens": 2048}'] [--runs 2] [--out auto.json]

Run 1 optimizes with an empty cache directory (the cost table is measured: every piece of the step on each
nano-batch shape the candidates cut, the GEMMs' carve-out per SM share, the decode rows per share and kernel);
later runs optimize the same model again in the same process and load the table (only the decode rows and the
replays are measured again). Per run: optimize()'s seconds and `schedule_search_s`, and per tuned shape the pick,
each replayed candidate's measured ms against its prediction (before that run's calibration), the candidates
predicted, and the calibration after the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

import nanoflow_fx
from benchmarks.common import build_model


def report(runtime) -> dict:  # type: ignore[no-untyped-def]
    shapes = []
    for t in runtime.tunings:
        predicted = dict(t.predicted)
        measured = dict(t.measured)
        rows = [{"candidate": c.label(), "ms": round(ms, 3),
                 "predicted_ms": round(predicted[c], 3) if c in predicted else None} for c, ms in t.measured]
        unsplit = next(ms for c, ms in t.measured if c.unsplit)
        shapes.append({"shape": str(t.shape), "chosen": t.chosen.label(), "chosen_ms": round(measured[t.chosen], 3),
                       "unsplit_ms": round(unsplit, 3), "speedup": round(unsplit / measured[t.chosen], 3),
                       "seconds": round(t.seconds, 1), "predicted": len(predicted), "replayed": rows,
                       "best_predicted": [(c.label(), round(ms, 3)) for c, ms in
                                          sorted(t.predicted, key=lambda item: item[1])[:8]]})
        print(f"## {t.shape}: {t.chosen.label()} {measured[t.chosen]:.2f} ms, unsplit {unsplit:.2f} ms "
              f"({unsplit / measured[t.chosen]:.3f}x); {len(t.measured)} of {len(predicted)} replayed in "
              f"{t.seconds:.1f} s")
        print("| candidate | measured ms | predicted ms |\n| --- | --- | --- |")
        for row in rows:
            print(f"| {row['candidate']} | {row['ms']} | {row['predicted_ms']} |")
    table = runtime.cost_table
    return {"shapes": shapes, "calibration": dict(table.calibration) if table else {},
            "carveout": {str(k): round(v, 3) for k, v in table.carveout.items()} if table else {},
            "decode": [{"sms": t.sms, "kernel": t.kernel.label() if t.kernel else "own", "ms": round(t.ms, 4),
                        "tb_s": round(t.tb_s, 3)} for t in runtime.decode_timings]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="{}", help="NanoFlowConfig fields (JSON)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default="auto.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    cache = tempfile.mkdtemp(prefix="nanoflow_auto_")
    fields = {"cache_dir": cache, **json.loads(args.config), "num_nanobatches": "auto"}
    runs = []
    for run in range(args.runs):
        start = time.perf_counter()
        nanoflow_fx.optimize(model, nanoflow_fx.NanoFlowConfig.from_dict(fields))
        seconds = time.perf_counter() - start
        runtime = model.nanoflow
        search_s = runtime.timings.get("schedule_search_s", 0.0)
        print(f"# run {run + 1}: optimize {seconds:.1f} s, schedule search {search_s:.1f} s "
              f"(max_num_tokens {runtime.config.max_num_tokens})", flush=True)
        runs.append({"optimize_s": round(seconds, 1), "schedule_search_s": round(search_s, 1),
                     "max_num_tokens": runtime.config.max_num_tokens, **report(runtime)})
        print("calibration:", runs[-1]["calibration"], "carve-out:", runs[-1]["carveout"], flush=True)
        del runtime  # (the next optimize() sizes its KV cache from the free memory: this one's must be freed)
    out = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

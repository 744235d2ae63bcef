"""`num_nanobatches="auto"`: the schedule search run inside `optimize()` on CUDA.

It glues the cost model to a built runtime: which dense step shapes are tuned (`search_shapes`), the cost table
kept on disk for this model, lowering, device and library versions (`cost.model`), the memory unit's decode
kernels and the GEMMs' carve-out measured on the device (`cost.measure`), then the predicted search with its
replays (`cost.measure.tune`), whose picks become the step runner's split policy (`cost.model.TunedPolicy`).

Under tensor parallelism every rank searches together: the driver's cost table (the key names the TP world size)
is every rank's, each time measured is the slowest rank's (`cost.measure.agreed`), so every rank replays the same
candidates (their collectives meet) and picks the same cuts; collective pieces run on the network unit in the
multi-unit candidates (NanoFlow's network overlap). The driver keeps the table on disk.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from nanoflow_fx.config import NanoFlowConfig
from nanoflow_fx.cost.measure import StepHarness, decode_kernel_timings, measure_carveout, measure_shape, tune
from nanoflow_fx.cost.model import (
    UNSPLIT,
    CostTable,
    DecodeTiming,
    StepShape,
    TunedPolicy,
    best_decode_kernels,
    candidates,
    decode_key,
    load_table,
    save_table,
    shape_key,
    table_key,
)
from nanoflow_fx.ops import backend as attention_backends
from nanoflow_fx.ops.backend import DecodeKernel
from nanoflow_fx.runtime.program_runner import make_units

if TYPE_CHECKING:
    from nanoflow_fx.model_runtime import NanoFlowRuntime

__all__ = ["AUTO_DECODE_VARIANT", "search_schedules", "search_shapes"]

log = logging.getLogger(__name__)


def search_shapes(config: NanoFlowConfig, free_pages: int) -> list[StepShape]:
    """The dense steps `num_nanobatches="auto"` tunes: the step budget as a mixed step (decodes at context 1024, a
    quarter of the budget or as many as the slots and 80% of the free KV pages hold, then one prefill chunk, like
    the steady state of a long-prompt workload) and as one prefill chunk. A chunk is one request's, so it is at
    most `max_seq_len` tokens (the step is then smaller than the budget). Other steps are cut like the nearest of
    them; decode-only steps run whole."""
    budget, page = int(config.max_num_tokens), config.page_size
    longest = int(config.max_seq_len)  # type: ignore[arg-type]
    context = min(1024, longest)
    room = int(0.8 * free_pages) - -(-min(budget, longest) // page)
    decodes = max(0, min(budget // 4, config.max_batch_size - 1, room // -(-context // page)))
    shapes = [StepShape(0, 0, min(budget, longest))]
    if decodes:
        shapes.insert(0, StepShape(decodes, context, min(budget - decodes, longest)))
    return shapes


def search_schedules(model: PreTrainedModel, runtime: NanoFlowRuntime, cost_dir: str) -> None:
    """`num_nanobatches="auto"` on CUDA: the cost table (kept on disk, `cost.model.load_table`) gets the memory
    unit's decode kernels per SM share (the backend's own and the Triton kernel's variant `AUTO_DECODE_VARIANT`, on
    the mixed shape's decode rows) and the GEMMs' carve-out factors; then every candidate cut of the tuned shapes is
    predicted, the few `cost.model.replay_order` names are replayed, and the fastest per shape is kept (the
    unsplit step unless a cut beats it by more than 1%)."""
    shares = (16, 32, 48, 64)
    vocab_size = model.config.get_text_config().vocab_size
    shapes = search_shapes(runtime.config, runtime.kv_cache.allocator.num_free)
    table = _cost_table(model, runtime, cost_dir)
    mixed = next((s for s in shapes if s.decodes), None)
    timings = _time_decode_kernels(runtime, vocab_size, mixed, (0, *shares)) if mixed is not None else []
    runtime.decode_timings = [t for t in timings if t.sms]
    if timings:
        assert mixed is not None  # (timings are measured on the mixed shape only)
        table.decode = {decode_key(t.sms, t.kernel): t.ms for t in timings}
        table.decode_ref = (mixed.decodes, mixed.context)
    decode = best_decode_kernels(runtime.decode_timings)
    space = candidates(shares=shares, fractions=(0.25, 0.5, 0.75), modes=("streams", "soft", "carveout"),
                       decode=decode, cuts=((1 / 3, 2 / 3), (0.25, 0.5, 0.75)))
    if not all(k in table.carveout for k in shares):
        _measure_carveout(runtime, vocab_size, table, shapes, shares)
    tunings = tune(runtime, vocab_size, shapes, space, make_units, table=table)
    runtime.tunings, runtime.cost_table = tunings, table
    try:
        if runtime.plane is None or runtime.plane.is_driver:
            save_table(cost_dir, table)
    except OSError as err:
        log.warning("nanoflow_fx: could not keep the cost table (%s); the next optimize() measures it again", err)
    runtime.split_policy = TunedPolicy({t.shape: t.chosen for t in tunings}, make_units)
    runtime.runner.split_policy = runtime.split_policy
    for t in tunings:
        unsplit = dict(t.measured)[UNSPLIT]
        log.info("nanoflow_fx: schedule search %s: %s (%.2f ms; unsplit %.2f ms; %d of %d candidates replayed) in "
                 "%.1f s", t.shape, t.chosen.label(), dict(t.measured)[t.chosen], unsplit, len(t.measured),
                 len(t.predicted), t.seconds)


def _measure_carveout(runtime: NanoFlowRuntime, vocab_size: int, table: CostTable, shapes: list[StepShape],
                      shares: tuple[int, ...]) -> None:
    """The GEMMs' carve-out factor per SM share into `table`, on the widest tuned shape that fits (its pieces, timed
    for the baseline, are kept: the search's predictions need them too). A failure leaves the carve-out candidates
    unpriced (and not replayed)."""
    fitting = [s for s in shapes if StepHarness.fits(runtime, s)]
    if not fitting:
        return
    widest = max(fitting, key=lambda s: s.tokens)
    key = shape_key(widest)
    try:
        if key not in table.pieces:
            table.pieces[key], table.host_ms[key] = measure_shape(runtime, vocab_size, widest)
        table.carveout.update(measure_carveout(runtime, vocab_size, widest, shares, table.pieces[key]))
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("nanoflow_fx: timing the GEMMs' SM carve-out failed (%s: %s)", type(err).__name__, err)


def _cost_table(model: PreTrainedModel, runtime: NanoFlowRuntime, cost_dir: str) -> CostTable:
    """The cost table kept for this model, lowering, device and versions, or a new empty one (under TP: the
    driver's, on every rank)."""
    import transformers
    import triton

    from nanoflow_fx import __version__ as nanoflow_version

    try:
        from importlib.metadata import version

        flashinfer = version("flashinfer-python")
    except Exception:  # noqa: BLE001 - not installed
        flashinfer = None
    cfg = runtime.config
    if runtime.device.type == "cuda":
        props = torch.cuda.get_device_properties(runtime.device)
        device, sms = props.name, props.multi_processor_count
    else:  # (the search runs on CUDA in optimize(); elsewhere only when called, e.g. in tests)
        device, sms = runtime.device.type, torch.get_num_threads()
    tp = runtime.tensor_parallel
    key = table_key({"model": model.config.to_dict(), "dtype": str(runtime.dtype), "device": device,
                     "sms": sms, "tensor_parallel": tp.world_size if tp is not None else 1,
                     "torch": torch.__version__,
                     "transformers": transformers.__version__, "triton": triton.__version__,
                     "flashinfer": flashinfer, "nanoflow_fx": nanoflow_version,
                     # what the pieces' times depend on of the configuration: the lowering (its passes and
                     # Inductor: one key, the saved step's too), the attention backend and the page size
                     "lowering": [runtime.lowering.key, runtime.attention_backend.name, cfg.page_size],
                     "kv_cache": str(runtime.kv_cache.dtype)})

    def kept_or_new() -> CostTable:
        table = load_table(cost_dir, key)
        if table is not None:
            log.info("nanoflow_fx: cost table %s loaded (%d nano-batch shapes measured)", key, len(table.pieces))
            return table
        return CostTable(key, runtime.step_fn.program.schedule_key, sms)

    # (under TP the driver's: the ranks' keys differ by their lowering, which bakes in the rank's shard)
    return kept_or_new() if runtime.plane is None else runtime.plane.share(kept_or_new)


# The Triton kernel's launch the memory unit is tried with: 128-token tiles, P rounded to the half type for P @ V
# (the variant that pulled the most bandwidth on 32-48-SM partitions, above FlashInfer's decode kernel there:
# benchmarks/RESULTS.md).
AUTO_DECODE_VARIANT = DecodeKernel("triton", (("block_n", 128), ("num_stages", 3), ("num_warps", 4),
                                              ("pv_precision", "half")))


def _time_decode_kernels(runtime: NanoFlowRuntime, vocab_size: int, mixed: StepShape,
                         shares: tuple[int, ...]) -> list[DecodeTiming]:
    """The decode kernels' timings over the decode rows of `mixed` on the SM shares (none when the model is not in
    a half type (the variant rounds P to it), when the Triton kernel cannot stand in here, or when the decode rows
    do not fit the cache: the backend's own kernel then)."""
    cache = runtime.kv_cache
    dtype, device = cache.model_dtype, cache.device
    if (dtype not in (torch.float16, torch.bfloat16)
            or attention_backends.stand_in(AUTO_DECODE_VARIANT.backend, runtime.attention_configs, dtype,
                                           device, cache.dtype) is None):
        return []
    decodes = StepShape(mixed.decodes, mixed.context, 0)
    if not StepHarness.fits(runtime, decodes):
        return []
    try:
        return decode_kernel_timings(runtime, vocab_size, decodes, shares, [AUTO_DECODE_VARIANT])
    except Exception as err:  # noqa: BLE001 - no partitions here (the search skips partitioned candidates too)
        log.warning("nanoflow_fx: timing decode kernels on SM partitions failed (%s: %s); the memory unit keeps %s's",
                    type(err).__name__, err, runtime.attention_backend.name)
        return []

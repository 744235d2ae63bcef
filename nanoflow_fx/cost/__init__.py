"""The cost model, and what measures it on the device.

- `model`: pure (no device): step shapes, candidate cuts, the cost table (its data, predictions, calibration and
  storage), the search's picks and the split policy they make.
- `measure`: on the device: replaying a step shape (`StepHarness`), the cost table's times, the decode kernels'
  timings, and the search's replays (`tune`). Imports `model`; `model` never imports it.
- `autotune`: `num_nanobatches="auto"` inside `optimize()`, running both.
- `device`: the device's measured ceilings (matmul rate, copy bandwidth) and the token budget they imply.
"""

from nanoflow_fx.cost.device import DeviceCeilings, measure_ceilings, token_budget

__all__ = ["DeviceCeilings", "measure_ceilings", "token_budget"]

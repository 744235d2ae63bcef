"""Cost model: the device's measured ceilings and what they imply (pure functions over plain dataclasses)."""

from nanoflow_fx.cost.device import DeviceCeilings, measure_ceilings, token_budget

__all__ = ["DeviceCeilings", "measure_ceilings", "token_budget"]

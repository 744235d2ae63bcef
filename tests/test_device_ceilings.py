"""Device ceilings: measured once per device type in a cache directory, so every process derives the same
defaults (the step budget) from the same figures; and the budget they give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanoflow_fx.cost import device
from nanoflow_fx.cost.device import DeviceCeilings, measure_ceilings, token_budget


def test_ceilings_are_measured_once_per_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = iter([DeviceCeilings("H", 7.0e14, 3.0e12), DeviceCeilings("H", 8.0e14, 2.7e12)])
    monkeypatch.setattr(device, "_measure", lambda d: next(measured))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "H")
    cuda = torch.device("cuda")
    first = measure_ceilings(cuda, tmp_path)
    assert measure_ceilings(cuda, tmp_path) == first  # read back, not measured again
    assert measure_ceilings(cuda, tmp_path / "other") == DeviceCeilings("H", 8.0e14, 2.7e12)
    (tmp_path / "device_ceilings.json").write_text("{not json")
    with pytest.raises(StopIteration):  # an unreadable file is measured again (nothing left to measure here)
        measure_ceilings(cuda, tmp_path)
    with pytest.raises(ValueError, match="CUDA devices"):
        measure_ceilings(torch.device("cpu"), tmp_path)


def test_the_budget_is_the_first_power_of_two_where_gemms_take_five_times_the_weight_reads() -> None:
    # bf16: T >= 5 F b / (2 B) = 5 F / B
    for flops, bandwidth in [(8.25e14, 3.0e12), (7.0e14, 3.3e12), (9.0e14, 2.7e12)]:  # an H100, +-10% noise
        assert token_budget(DeviceCeilings("x", flops, bandwidth), 2) == 2048  # 1375, 1061, 1667
    assert token_budget(DeviceCeilings("x", 6.0e14, 3.0e12), 2) == 1024  # 1000
    assert token_budget(DeviceCeilings("x", 1.0e12, 3.0e12), 2) == 256  # the floor
    assert token_budget(DeviceCeilings("x", 1.0e17, 1.0e12), 2) == 8192  # the ceiling

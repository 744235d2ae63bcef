"""Capture: HF attention -> `nanoflow::paged_attention`, and the Dynamo backend that records ATen graphs."""

from nanoflow_fx.capture.backend import make_backend
from nanoflow_fx.capture.step import StepFunction

__all__ = ["StepFunction", "make_backend"]

"""The custom operator nanoflow_fx captures attention into, and the step metadata it reads."""

from nanoflow_fx.ops.attention import paged_attention
from nanoflow_fx.ops.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "paged_attention"]

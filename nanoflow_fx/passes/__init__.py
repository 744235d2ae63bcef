"""Graph analyses over the captured ATen step that the lowering uses (`capture.lowering`).

`annotate` records, per node, its op class, FLOPs, bytes, token dimension and whether it is token-parallel
(each output token row depends only on the same rows of its inputs); `capture.program` cuts the step into pieces
by it and marks the pieces that mix tokens whole. `info(node)` reads a node's record.
"""

from nanoflow_fx.passes.annotate import annotate, token_symbol
from nanoflow_fx.passes.info import META_KEY, NodeInfo, info

__all__ = ["META_KEY", "NodeInfo", "annotate", "info", "token_symbol"]

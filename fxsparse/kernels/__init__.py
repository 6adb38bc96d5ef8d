"""Custom ops and their Triton kernels. Importing this package registers the ops.

Kernels never import passes: they see tensors and numbers, never plans or graphs.
"""

from .prefill_linear import prefill_linear, prefill_linear_reference
from .prune24 import prune24_reference, prune24_triton  # the op: torch.ops.fxsparse.prune24
from .threshold_linear import keep_mask_reference, threshold_linear, threshold_linear_reference
from .topk_linear import topk_keep_count, topk_keep_mask_reference, topk_linear, topk_linear_reference

__all__ = ["keep_mask_reference", "prefill_linear", "prefill_linear_reference",
           "prune24_reference", "prune24_triton", "threshold_linear",
           "threshold_linear_reference",
           "topk_keep_count", "topk_keep_mask_reference", "topk_linear", "topk_linear_reference"]

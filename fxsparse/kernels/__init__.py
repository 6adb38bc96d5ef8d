"""Custom ops and their Triton kernels. Importing this package registers the ops.

Kernels never import passes: they see tensors and numbers, never plans or graphs.
"""

from .threshold_linear import keep_mask_reference, threshold_linear, threshold_linear_reference

__all__ = ["keep_mask_reference", "threshold_linear", "threshold_linear_reference"]

"""Custom ops and their Triton kernels. Importing this package registers the ops.

Kernels never import passes: they see tensors and numbers, never plans or graphs.
"""

import torch

from .prefill_linear import prefill_linear, prefill_linear_reference
from .prune24 import prune24_reference, prune24_triton  # the op: torch.ops.fxsparse.prune24
from .tap import keep_tap
from .threshold_linear import keep_mask_reference, threshold_linear, threshold_linear_reference
from .topk_linear import topk_keep_count, topk_keep_mask_reference, topk_linear, topk_linear_reference

__all__ = ["keep_mask_reference", "keep_tap", "prefill_linear", "prefill_linear_reference",
           "prune24_reference", "prune24_triton", "threshold_linear",
           "threshold_linear_reference",
           "topk_keep_count", "topk_keep_mask_reference", "topk_linear", "topk_linear_reference"]


def _without_autocast(op, device_type: str):
    def run(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return run


# The ops compute in their inputs' dtypes, as their fake impls say. Autocast has no rule for
# them, so without these kernels the Python implementations' own F.linear calls would autocast
# while a traced graph (fake impls) would not. (The lower pass keeps autocast's output dtype.)
_AUTOCAST = torch.library.Library("fxsparse", "IMPL")
for _name in ("threshold_linear", "threshold_linear_group", "threshold_linear_act", "threshold_linear_acc",
              "topk_linear", "prefill_linear", "prune24"):
    for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _AUTOCAST.impl(_name, _without_autocast(getattr(torch.ops.fxsparse, _name).default, _device), _key)

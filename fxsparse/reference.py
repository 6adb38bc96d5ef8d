"""Eager reference: apply a plan to a model with forward-pre-hooks, no compiler involved.

This is the oracle the compiled model is tested against, and a way to check a plan on a model
that Dynamo cannot trace. Hooks are per instance and removable; no class is patched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .kernels import keep_mask_reference
from .plan import SparsityPlan

__all__ = ["plan_hooks"]


@contextmanager
def plan_hooks(model: nn.Module, plan: SparsityPlan) -> Iterator[nn.Module]:
    """Within the block, every planned ``nn.Linear`` of ``model`` thresholds its input."""
    plan.check_model(model)
    modules = dict(model.named_modules())
    handles = []
    for name, lp in plan.layers.items():
        center, scale, thr = lp.center_tensor(), lp.scale_tensor(), lp.threshold

        def hook(_mod, args, center=center, scale=scale, thr=thr):
            x = args[0]
            c = None if center is None else center.to(x.device)
            s = None if scale is None else scale.to(x.device)
            keep = keep_mask_reference(x, thr, c, s)
            fill = torch.zeros((), dtype=x.dtype, device=x.device) if c is None else c.to(x.dtype)
            return (torch.where(keep, x, fill), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()

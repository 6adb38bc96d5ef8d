"""Eager reference: apply a plan to a model with forward-pre-hooks, no compiler involved.

This is the oracle the compiled model is tested against, and a way to check a plan on a model
that Dynamo cannot trace. Hooks are per instance and removable; no class is patched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .kernels import keep_mask_reference, topk_keep_count, topk_keep_mask_reference
from .kernels.crossover import NEVER, resolve_min_rows_24
from .kernels.prefill_linear import branch
from .kernels.prune24 import prune24_reference
from .kernels.threshold_linear import fill_value
from .plan import LayerPlan, SparsityPlan

__all__ = ["keep_mask", "plan_hooks"]


def keep_mask(lp: LayerPlan, x: torch.Tensor, center: torch.Tensor | None,
              scale: torch.Tensor | None) -> torch.Tensor:
    """The keep mask plan entry ``lp``'s op takes on ``x`` (threshold or top-k); ``center`` and
    ``scale`` are ``lp``'s as tensors on ``x``'s device."""
    if lp.method == "topk":
        return topk_keep_mask_reference(x, topk_keep_count(lp.in_features, lp.target_sparsity or 0.0),
                                        center, scale)
    return keep_mask_reference(x, lp.threshold, center, scale)


@contextmanager
def plan_hooks(model: nn.Module, plan: SparsityPlan,
               probes: Mapping[str, nn.Module] | None = None, *,
               crossover_rows: int | None = None) -> Iterator[nn.Module]:
    """Within the block, every planned layer of ``model`` sparsifies its input as its op would
    (threshold or top-k), feeding the dense input to ``probes[name]`` first if given.

    Layers with ``prefill`` ``"dense"`` or ``"2:4"`` follow ``fxsparse::prefill_linear``'s rule
    per call: threshold up to ``decode_rows`` rows, 2:4 (``prune24``) from ``min_rows_24`` rows
    (``crossover_rows`` if given, else the crossover the backend would measure on CUDA, else
    never), the input unchanged between.

    No compiler involved: a sweep over many plans pays no Dynamo tracing per plan.
    """
    plan.check_model(model)
    modules = dict(model.named_modules())
    handles = []
    for name, lp in plan.layers.items():
        center, scale = lp.center_tensor(), lp.scale_tensor()
        min_rows_24 = NEVER
        if lp.prefill == "2:4":
            w = modules[name].weight
            epilogue = getattr(modules[name], "bias", None) is not None or center is not None
            min_rows_24 = resolve_min_rows_24(lp.out_features, lp.in_features, w.dtype, w.device,
                                              crossover_rows, epilogue)

        def hook(_mod, args, lp=lp, center=center, scale=scale, name=name, m24=min_rows_24):
            x = args[0]
            c = None if center is None else center.to(x.device)
            s = None if scale is None else scale.to(x.device)
            if probes is not None and name in probes:
                probes[name](x)
            if lp.prefill != "threshold":
                which = branch(x.numel() // max(x.shape[-1], 1), lp.decode_rows, m24)
                if which == "2:4":
                    return (prune24_reference(x, c), *args[1:])
                if which == "dense":
                    return None
            keep = keep_mask(lp, x, c, s)
            return (torch.where(keep, x, fill_value(x, c)), *args[1:])

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()

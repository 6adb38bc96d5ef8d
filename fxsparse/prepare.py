"""Prepare a model for the sparse kernels, and the one-call recipe ``fxsparse.compile``.

The sparse GEMV kernel reads the weight column-major (``W.t()`` contiguous), so that skipping an
input channel skips one contiguous run of bytes. ``prepare_weights`` converts the planned
layers' weights in place, one layer at a time (peak memory: the model plus its largest planned
weight), keeping the ``nn.Parameter`` objects; cuBLAS takes either layout for the dense path, so
nothing else changes. Done before ``torch.compile``, it costs no recompilation (Dynamo guards
on strides).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .passes.lower import dense_reason, group_width, sibling_sets
from .plan import SparsityPlan

__all__ = ["prepare_weights", "compile"]


@torch.no_grad()
def prepare_weights(model: nn.Module, plan: SparsityPlan, *, device_types: tuple[str, ...] = ("cuda",),
                    dense_when_faster: bool = True, group_siblings: bool = True) -> list[str]:
    """Make each planned linear's weight column-major in place; return the names converted.

    Only weights on ``device_types`` are converted (the CPU path gains nothing from it), and not
    those of layers the lower pass will run dense (cuBLAS's usual layout; ``dense_reason``, with
    ``dense_when_faster`` and ``group_siblings`` as the backend options of the same names).
    A layer whose calls in some graph all have more rows than the kernel takes (lowered there
    as ``"mask+linear"``) is still converted: there are no row counts here, and its one-row
    (decode) graphs run the kernel on the same weight; cuBLAS takes either layout.
    """
    plan.check_model(model)
    modules = dict(model.named_modules())
    sets = sibling_sets(plan)
    done = []
    for name, lp in plan.layers.items():
        if not isinstance(modules[name], nn.Linear):
            continue  # GPT-2's Conv1D already stores W [in, out]: the kernel's layout
        w = modules[name].weight
        if w.device.type not in device_types or (w.stride(0) == 1 and w.stride(1) == w.shape[0]):
            continue
        width = group_width(plan, name, sets, group_siblings)
        if dense_reason(lp, w.dtype, w.device, dense_when_faster, width) is not None:
            continue  # lowered dense: cuBLAS's usual layout
        w.data = w.data.t().contiguous().t()
        done.append(name)
    return done


def compile(  # noqa: A001  (torch.compile's twin, on purpose)
    model: nn.Module,
    plan: SparsityPlan | str | os.PathLike | Mapping[str, Any],
    *,
    mode: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    **options: Any,
) -> nn.Module:
    """Validate ``plan`` against ``model``, prepare its weights, and ``torch.compile`` it.

    Equivalent to ``torch.compile(model, backend="sparse_act", options={"plan": plan, ...})``
    with the plan checked up front and the weights laid out for the sparse kernel.
    """
    plan = SparsityPlan.coerce(plan)
    plan.check_model(model)
    prepare_weights(model, plan, dense_when_faster=options.get("dense_when_faster", True),
                    group_siblings=options.get("group_siblings", True))
    opts = {"plan": plan, **options}
    if mode is not None:
        opts["mode"] = mode
    return torch.compile(model, backend="sparse_act", options=opts, fullgraph=fullgraph,
                         dynamic=dynamic)

"""Prepare a model for the sparse kernels, and the one-call recipe ``fxsparse.compile``.

The sparse GEMV kernel reads the weight column-major (``W.t()`` contiguous), so that skipping an
input channel skips one contiguous run of bytes. ``prepare_weights`` converts the planned
layers' weights in place, one layer at a time (peak memory: the model plus its largest planned
weight), keeping the ``nn.Parameter`` objects; cuBLAS takes either layout for the dense path, so
nothing else changes. Done before ``torch.compile``, it costs no recompilation (Dynamo guards
on strides). A weight tied to another tensor (``lm_head`` sharing the token embedding) stays
row-major: the sparse op is exact with any strides, column-major is only its fast layout.
An 8-bit torchao weight (``quantized.weight_format``) gets its ``qdata`` laid out column-major in
place (``quantized.to_column_major``); one the kernel cannot read is left as torchao made it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import sharding
from .dispatch import SiteFacts, decide, sibling_sets
from .logs import log
from .plan import SparsityPlan, uncompiled
from .quantized import is_torchao, to_column_major, weight_format

__all__ = ["prepare_weights", "compile"]


@torch.no_grad()
def prepare_weights(model: nn.Module, plan: SparsityPlan, *, device_types: tuple[str, ...] = ("cuda",),
                    dense_when_faster: bool = True, group_siblings: bool = True) -> list[str]:
    """Make each planned linear's weight column-major in place; return the names converted.

    Only weights on ``device_types`` are converted (the CPU path gains nothing from it), and not
    those of layers the lower pass will run dense (cuBLAS's usual layout; ``dispatch.decide``,
    with ``dense_when_faster`` and ``group_siblings`` as the backend options of the same names).
    A layer whose calls in some graph all have more rows than the kernel takes (lowered there
    as ``"mask+linear"``) is still converted: there are no row counts here, and its one-row
    (decode) graphs run the kernel on the same weight; cuBLAS takes either layout.

    A weight whose memory another parameter or buffer shares (tied weights: the same
    ``nn.Parameter`` under two module names, or one storage) is left row-major, and the
    ``fxsparse`` logger says so at INFO: converting it would make the other module's tensor
    (e.g. the token embedding) column-major too, which ``state_dict`` consumers such as
    safetensors reject, or, for a distinct ``Parameter``, silently untie the two.
    """
    model = uncompiled(model)
    plan.check_model(model)
    modules = dict(model.named_modules())
    sets = sibling_sets(plan)
    spans = None  # (name, device, first byte, end) of every parameter and buffer, on first need
    done = []
    for name in plan.layers:
        if not isinstance(modules[name], nn.Linear):
            continue  # GPT-2's Conv1D already stores W [in, out]: the kernel's layout
        w = modules[name].weight
        fmt = weight_format(w)
        if fmt.kind == "unsupported":
            continue  # torchao's own path runs it (the lower pass says why)
        # the kernel's data: this rank's piece (tensor parallelism), or an 8-bit weight's data
        data = fmt.qdata if fmt.quantized else sharding.local_tensor(w)
        if w.device.type not in device_types or (data.stride(0) == 1 and data.stride(1) == data.shape[0]):
            continue
        members = sets[name] if group_siblings else (name,)
        piece, width, unsliceable = sharding.layer_piece(plan, name, members, sharding.weight_layout(w))
        facts = SiteFacts(plan=piece, device=w.device, weight_dtype=w.dtype, width=width,
                          unsliceable=unsliceable, weights=fmt.kind if fmt.quantized else None)
        if decide(facts, dense_when_faster=dense_when_faster).branch == "dense":
            continue  # lowered dense: cuBLAS's usual layout
        if spans is None:  # taken before any conversion: freed old weights never overlap a live one
            spans = [(n, t.device, *_span(_data(t))) for n, t in (
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False)) if t.numel() and _data(t) is not None]
        own = f"{name}.weight" if name else "weight"
        lo, hi = _span(data)
        tied = [n for n, dev, a, b in spans if n != own and dev == w.device and a < hi and lo < b]
        if tied:
            log.info("prepare_weights: %s left row-major: its memory is shared with %s (tied "
                     "weights; the sparse op takes either layout, column-major is only faster)",
                     own, ", ".join(tied))
            continue
        if fmt.quantized:
            to_column_major(w)
        else:
            sharding.make_column_major(w)
        done.append(name)
    return done


def _data(t: torch.Tensor) -> torch.Tensor | None:
    """The memory a parameter's values live in: itself, a torchao tensor's 8-bit data (None for
    other tensor subclasses, which share nothing the kernel's layout would change)."""
    if not is_torchao(t):
        return t
    fmt = weight_format(t)
    return fmt.qdata if fmt.quantized else None


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The address range ``[first byte, end)`` of a tensor's elements. Tied weights (one
    ``Parameter`` under two names, two on one storage, a transposed view) overlap; disjoint
    slices of one buffer (fused projections) do not."""
    t = sharding.local_tensor(t)
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


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

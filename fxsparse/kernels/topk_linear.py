"""``fxsparse::topk_linear``: a linear layer that keeps only the ``k`` largest inputs of each row.

Top-k activation sparsity (Sparsing Law, Luo et al. 2024, arXiv:2411.02335, seed 003) keeps a
fixed number of channels per token instead of a calibrated threshold. Semantics (the one
definition every implementation must match)::

    d     = |x - center| * channel_scale          # float32; center 0 and scale 1 when None
    tau_r = k-th largest d of row r               # NaN ranks above every number (torch.topk)
    keep  = not (d < tau_r)                       # ties with tau_r are kept; NaN is kept
    out   = F.linear(where(keep, x, center), weight, bias)

Ties at the boundary are all kept (a row keeps at least ``k``), so the result never depends on
sort order; ``k <= 0`` drops every finite entry, ``k >= in_features`` keeps all, and a row with
``k`` or more NaN scores keeps everything. ``topk_keep_count`` turns ``target_sparsity`` into
``k``. Implementations: a plain-torch reference (CPU, and registered for CUDA), a fake impl;
autograd treats the mask as a constant, as ``threshold_linear`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .threshold_linear import check_linear_args, drop_score, fill_value, masked_linear_backward

__all__ = ["topk_linear", "topk_linear_reference", "topk_keep_mask_reference", "topk_keep_count"]


def topk_keep_count(in_features: int, sparsity: float) -> int:
    """Entries kept per row for a target dropped fraction: ``in_features - round(s * in_features)``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return in_features - int(round(sparsity * in_features))


def topk_keep_mask_reference(
    x: Tensor, k: int, center: Tensor | None, channel_scale: Tensor | None
) -> Tensor:
    """Boolean mask of the entries of ``x`` that survive the per-row top-k rule."""
    d = drop_score(x, center, channel_scale)
    n = d.shape[-1]
    if k >= n or d.numel() == 0:
        return torch.ones_like(d, dtype=torch.bool)
    if k <= 0:
        tau = torch.full_like(d[..., :1], float("inf"))
    else:
        tau = torch.topk(d, k, dim=-1, largest=True, sorted=True).values[..., k - 1:k]
    return ~(d < tau)


def topk_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
) -> Tensor:
    """Pure-torch reference of the op (the CPU and CUDA implementation, and the tests' oracle)."""
    keep = topk_keep_mask_reference(x, k, center, channel_scale)
    return F.linear(torch.where(keep, x, fill_value(x, center)), weight, bias)


def _check_args(x, weight, bias, center, channel_scale) -> None:
    check_linear_args("topk_linear", x, weight, bias, center, channel_scale)


@torch.library.custom_op("fxsparse::topk_linear", mutates_args=())
def topk_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    k: int,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
) -> Tensor:
    """``F.linear(x with all but the k largest |x - center|*scale of each row set to center)``."""
    _check_args(x, weight, bias, center, channel_scale)
    return topk_linear_reference(x, weight, bias, k, center, channel_scale)


@topk_linear.register_fake
def _(x, weight, bias, k, center=None, channel_scale=None):
    _check_args(x, weight, bias, center, channel_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@topk_linear.register_kernel("cuda")
def _topk_linear_cuda_torch_composition(x, weight, bias, k, center=None, channel_scale=None):
    # No dedicated kernel yet: torch.topk + cuBLAS, the same composition as the reference.
    _check_args(x, weight, bias, center, channel_scale)
    return topk_linear_reference(x, weight, bias, k, center, channel_scale)


# -- autograd: the mask is a constant of the forward (straight-through on kept entries) -------


def _setup_context(ctx, inputs, output):
    x, weight, bias, k, center, channel_scale = inputs
    keep = topk_keep_mask_reference(x, k, center, channel_scale)
    ctx.save_for_backward(x, weight, keep, center)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    return (*masked_linear_backward(ctx, grad), None, None, None)


topk_linear.register_autograd(_backward, setup_context=_setup_context)

"""``fxsparse::prefill_linear``: the threshold op for decode, dense or 2:4 for prefill.

Semantics (rows = ``x.numel() // in_features``, known on the host)::

    rows <= decode_rows         -> threshold_linear(x, W, b, threshold, center, channel_scale)
    rows >= min_rows_24         -> F.linear(prune24(x, center), W, b)     # 2:4 along K
    otherwise                   -> F.linear(x, W, b)                      # dense

(the first rule wins when ``min_rows_24 <= decode_rows``). ``prefill="dense"`` is this op with
``min_rows_24 = NEVER``: one dispatch rule to implement, test and explain, rather than a kind
string. ``prune24`` ranks by ``|x - center|`` only: ``threshold`` and ``channel_scale`` apply to
decode rows. CUDA: the sparse GEMV for decode rows, cuBLAS for dense rows, ``sparse24_linear`` for
2:4 rows; shapes cuSPARSELt cannot take get no measured crossover (they stay dense), and with an
explicit ``crossover_rows`` run ``prune24`` + cuBLAS. Autograd: the masked-linear backward with
the mask of the branch taken (all-true for dense rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .prune24 import keep24_reference, prune24_reference, prune24_triton
from .threshold_linear import (
    check_linear_args,
    keep_mask_reference,
    masked_linear_backward,
    threshold_linear_cuda,
    threshold_linear_reference,
)

__all__ = ["prefill_linear", "prefill_linear_reference", "branch"]


def _rows(x: Tensor) -> int:
    return x.numel() // max(int(x.shape[-1]), 1)


def branch(rows: int, decode_rows: int, min_rows_24: int) -> str:
    """``"threshold"``, ``"2:4"`` or ``"dense"``: what a call with ``rows`` rows runs."""
    if rows <= decode_rows:
        return "threshold"
    return "2:4" if rows >= min_rows_24 else "dense"


def prefill_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None,
    channel_scale: Tensor | None,
    center_bias: Tensor | None,
    decode_rows: int,
    min_rows_24: int,
) -> Tensor:
    """Pure-torch reference (the CPU implementation and the tests' oracle)."""
    which = branch(_rows(x), decode_rows, min_rows_24)
    if which == "threshold":
        return threshold_linear_reference(x, weight, bias, threshold, center, channel_scale)
    if which == "2:4":
        return F.linear(prune24_reference(x, center), weight, bias)
    return F.linear(x, weight, bias)


def _check_args(x, weight, bias, center, channel_scale, center_bias, decode_rows, min_rows_24):
    check_linear_args("prefill_linear", x, weight, bias, center, channel_scale)
    n = weight.shape[0]
    if center_bias is not None:
        torch._check(center_bias.shape == (n,), lambda: f"prefill_linear: center_bias must be ({n},)")
    torch._check(decode_rows >= 0 and min_rows_24 >= 0,
                 lambda: "prefill_linear: decode_rows and min_rows_24 must be >= 0")


@torch.library.custom_op("fxsparse::prefill_linear", mutates_args=())
def prefill_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None,
    channel_scale: Tensor | None,
    center_bias: Tensor | None,
    decode_rows: int,
    min_rows_24: int,
) -> Tensor:
    """Threshold op for ``rows <= decode_rows``, 2:4 for ``rows >= min_rows_24``, else dense."""
    _check_args(x, weight, bias, center, channel_scale, center_bias, decode_rows, min_rows_24)
    return prefill_linear_reference(x, weight, bias, threshold, center, channel_scale, center_bias,
                                    decode_rows, min_rows_24)


@prefill_linear.register_fake
def _(x, weight, bias, threshold, center, channel_scale, center_bias, decode_rows, min_rows_24):
    _check_args(x, weight, bias, center, channel_scale, center_bias, decode_rows, min_rows_24)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@prefill_linear.register_kernel("cuda")
def _(x, weight, bias, threshold, center, channel_scale, center_bias, decode_rows, min_rows_24):
    _check_args(x, weight, bias, center, channel_scale, center_bias, decode_rows, min_rows_24)
    which = branch(_rows(x), decode_rows, min_rows_24)
    if which == "threshold":
        return threshold_linear_cuda(x, weight, bias, threshold, center, channel_scale, center_bias)
    if which == "dense":
        return F.linear(x, weight, bias)
    from . import sparse24

    n, k = weight.shape
    reason = sparse24.unsupported_reason(n, k, x.dtype, x.device)
    if reason is None and weight.dtype != x.dtype:
        reason = f"x is {x.dtype} but the weight is {weight.dtype}"
    if reason is not None:
        sparse24.log_once(f"fxsparse: prefill_linear {n}x{k}: no sparse tensor cores ({reason}); "
                          "running prune24 + dense matmul")
        return F.linear(prune24_triton(x, center), weight, bias)
    out = sparse24.sparse24_linear(x.reshape(-1, k), weight, bias, center, center_bias)
    return out.view(*x.shape[:-1], n)


# -- autograd: the mask of the branch taken is a constant of the forward ----------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, threshold, center, channel_scale, _, decode_rows, min_rows_24 = inputs
    which = branch(_rows(x), decode_rows, min_rows_24)
    if which == "threshold":
        keep = keep_mask_reference(x, threshold, center, channel_scale)
    elif which == "2:4":
        keep = keep24_reference(x, center)
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    ctx.save_for_backward(x, weight, keep, center)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    return (*masked_linear_backward(ctx, grad), None, None, None, None, None, None)


prefill_linear.register_autograd(_backward, setup_context=_setup_context)

"""``fxsparse::threshold_linear``: a linear layer whose small input activations are dropped.

Semantics (the one definition every implementation must match)::

    d    = |x - center| * channel_scale          # float32; center 0 and scale 1 when None
    keep = not (d < threshold)                   # NaN is never "below", so NaN is kept
    out  = F.linear(where(keep, x, center), weight, bias)

Dropped entries snap to ``center`` (SCAP's mode-centering, seed 001), so the output gains the
constant ``W @ center``; ``center_bias`` is that product computed once, which kernels that read
only the kept columns of ``W`` need. Variants: ``_group`` (several weights sharing ``x`` and the
mask: q/k/v, gate/up; one launch on CUDA), ``_act`` (the input is ``act(a) * b``, computed by the
kernel as it loads, inference only) and ``_acc`` (adds outputs unrounded into a float32 buffer
its reader rounds, so the kernel needs no split-K epilogue). Each has a plain-torch reference
(CPU, and a named fallback anywhere), a fake impl for tracing, and on CUDA the fused kernel of
``sparse_gemv.py`` for one or two rows, mask + cuBLAS above that.

8-bit weights are a weight format of each op, not other ops: given ``weight_scale`` (one
float32 [N] per weight; ``weight_scales`` for the list ops), ``weight`` is 8-bit data ``q``
[N, K] (int8 or fp8 e4m3, ``QUANT_DTYPES``; what torchao's weight-only configs store) and stands
for ``q.float() * weight_scale[:, None]``: the reference dequantizes and computes in float32,
rounding the output to x's dtype once; the kernel accumulates ``q * (x - c)`` in float32 and
scales the sums. Inference only for 8-bit weights (x's gradient flows; the weight has none).
Above two rows on CUDA an 8-bit call runs the mask, then the reference's float32 linear
(compiled graphs run torchao's linear there instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .center_bias import dequantize

__all__ = ["ACTIVATIONS", "QUANT_DTYPES", "activation_reference", "keep_mask_reference", "threshold_linear",
           "threshold_linear_acc", "threshold_linear_acc_reference", "threshold_linear_act",
           "threshold_linear_cuda", "threshold_linear_group", "threshold_linear_reference"]

# the activations ``threshold_linear_act`` computes, by name: torch's own functions
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "relu": F.relu,
}


# 8-bit weight data the ops read with a per-output-channel scale (``weight_scale``)
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # ``t.to(dtype)`` returns ``t`` itself when nothing changes, which an op may not return.
    return t if t.dtype == dtype else t.to(dtype)


def drop_score(x: Tensor, center: Tensor | None, channel_scale: Tensor | None) -> Tensor:
    """``|x - center| * channel_scale`` in float32: the score every sparse op ranks entries by."""
    d = _as(x, torch.float32)
    if center is not None:
        d = d - _as(center, torch.float32)
    d = d.abs()
    if channel_scale is not None:
        d = d * _as(channel_scale, torch.float32)
    return d


def keep_mask_reference(
    x: Tensor, threshold: float, center: Tensor | None, channel_scale: Tensor | None
) -> Tensor:
    """Boolean mask of the entries of ``x`` that survive the threshold (float32 comparison)."""
    return ~(drop_score(x, center, channel_scale) < float(threshold))


def threshold_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
    center_bias: Tensor | None = None,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """Pure-torch reference of the op (the CPU implementation, and the tests' oracle)."""
    del center_bias  # an optimisation for kernels that skip columns; not needed here
    keep = keep_mask_reference(x, threshold, center, channel_scale)
    return linear_reference(torch.where(keep, x, fill_value(x, center)), weight, bias, weight_scale)


def linear_reference(xm: Tensor, weight: Tensor, bias: Tensor | None, weight_scale: Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """``F.linear(xm, weight, bias)``; with ``weight_scale``: the dequantized 8-bit weight, in
    float32 (float64 for float64 ``xm``), rounded once to ``out_dtype`` (default xm's dtype)."""
    if weight_scale is None:
        return F.linear(xm, weight, bias)
    ct = torch.float64 if xm.dtype == torch.float64 else torch.float32
    out = F.linear(_as(xm, ct), _as(dequantize(weight, weight_scale), ct),
                   None if bias is None else _as(bias, ct))
    return out.to(out_dtype or xm.dtype)


def check_linear_args(op: str, x, weight, bias, center, channel_scale) -> None:
    """Shape checks shared by the sparse linear ops; errors name the op and the argument."""
    k = x.shape[-1]
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got {weight.dim()}-D")
    torch._check(
        weight.shape[1] == k,
        lambda: f"{op}: x has {k} input features but weight is {tuple(weight.shape)}",
    )
    n = weight.shape[0]
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"{op}: bias must be ({n},)")
    if center is not None:
        torch._check(
            center.dim() == 0 or center.shape == (k,),
            lambda: f"{op}: center must be a scalar or ({k},), got {tuple(center.shape)}",
        )
    if channel_scale is not None:
        torch._check(
            channel_scale.shape == (k,),
            lambda: f"{op}: channel_scale must be ({k},), got {tuple(channel_scale.shape)}",
        )


def fill_value(x: Tensor, center: Tensor | None) -> Tensor:
    """What a dropped entry becomes: the center in x's dtype (zero without one)."""
    return torch.zeros((), dtype=x.dtype, device=x.device) if center is None else center.to(x.dtype)


def check_weight_scale(op: str, x: Tensor, weight: Tensor, weight_scale: Tensor | None) -> None:
    """An 8-bit weight comes with its float32 per-output-channel scale, and only it does."""
    if weight_scale is None:
        torch._check(weight.dtype not in QUANT_DTYPES,
                     lambda: f"{op}: an 8-bit weight ({weight.dtype}) needs its weight_scale")
        return
    torch._check(weight.dtype in QUANT_DTYPES,
                 lambda: f"{op}: weight_scale is for 8-bit weights {QUANT_DTYPES}, weight is {weight.dtype}")
    n = weight.shape[0]
    torch._check(weight_scale.dtype == torch.float32 and weight_scale.shape == (n,),
                 lambda: f"{op}: weight_scale must be float32 ({n},), got {weight_scale.dtype} "
                 f"{tuple(weight_scale.shape)}")
    torch._check(x.is_floating_point() and x.dtype not in QUANT_DTYPES,
                 lambda: f"{op}: x must be a 16/32/64-bit float with an 8-bit weight, got {x.dtype}")


def _check_args(x, weight, bias, center, channel_scale, center_bias, weight_scale=None) -> None:
    check_linear_args("threshold_linear", x, weight, bias, center, channel_scale)
    check_weight_scale("threshold_linear", x, weight, weight_scale)
    if center_bias is not None:
        n = weight.shape[0]
        torch._check(center_bias.shape == (n,), lambda: f"threshold_linear: center_bias must be ({n},)")


@torch.library.custom_op("fxsparse::threshold_linear", mutates_args=())
def threshold_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None = None,
    channel_scale: Tensor | None = None,
    center_bias: Tensor | None = None,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """``F.linear(where(|x - center|*scale >= threshold, x, center), weight, bias)``; with
    ``weight_scale`` the weight is ``weight.float() * weight_scale[:, None]`` (8-bit ``weight``)."""
    _check_args(x, weight, bias, center, channel_scale, center_bias, weight_scale)
    return threshold_linear_reference(x, weight, bias, threshold, center, channel_scale,
                                      weight_scale=weight_scale)


@threshold_linear.register_fake
def _(x, weight, bias, threshold, center=None, channel_scale=None, center_bias=None, weight_scale=None):
    _check_args(x, weight, bias, center, channel_scale, center_bias, weight_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def threshold_linear_cuda(x, weight, bias, threshold, center=None, channel_scale=None, center_bias=None,
                          weight_scale=None):
    """The CUDA implementation: the fused sparse GEMV for one row, one mask kernel + cuBLAS above
    (8-bit weights: the mask kernel, then the reference's float32 linear).

    Also the decode path of ``fxsparse::prefill_linear`` (called directly, no second dispatch).
    """
    _check_args(x, weight, bias, center, channel_scale, center_bias, weight_scale)
    from . import sparse_gemv

    if sparse_gemv.supports(x, weight, weight_scale=weight_scale):
        return sparse_gemv.threshold_gemv(
            x, weight, bias, threshold, center, channel_scale, center_bias, weight_scale=weight_scale
        )
    if x.dtype in sparse_gemv._DTYPES:  # one mask kernel, then cuBLAS
        return linear_reference(sparse_gemv.masked_input(x, threshold, center, channel_scale), weight, bias,
                                weight_scale)
    return threshold_linear_reference(x, weight, bias, threshold, center, channel_scale,
                                      weight_scale=weight_scale)


threshold_linear.register_kernel("cuda")(threshold_linear_cuda)


# -- autograd: the mask is a constant of the forward (straight-through on kept entries) -------


def _setup_context(ctx, inputs, output):
    x, weight, bias, threshold, center, channel_scale, _, weight_scale = inputs
    keep = keep_mask_reference(x, threshold, center, channel_scale)
    ctx.quantized = weight_scale is not None  # the gradient flows through the dequantized weight
    saved = weight if weight_scale is None else dequantize(weight, weight_scale)
    ctx.save_for_backward(x, saved, keep, center)
    ctx.has_bias = bias is not None


def masked_linear_backward(ctx, grad):
    """(grad_x, grad_w, grad_b) of ``F.linear(where(keep, x, fill), W, b)`` with ``keep`` held
    constant; ``ctx`` saved (x, weight, keep, center), ``has_bias`` and ``quantized`` (an 8-bit
    weight, saved dequantized: no gradient for it). Shared by the ops."""
    x, weight, keep, center = ctx.saved_tensors
    xm = torch.where(keep, x, fill_value(x, center))
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = torch.where(keep, grad @ _as(weight, grad.dtype), torch.zeros((), dtype=grad.dtype))
    grad_w = None
    if not getattr(ctx, "quantized", False):
        grad_w = _as(g2.t() @ _as(xm.reshape(-1, xm.shape[-1]), grad.dtype), weight.dtype)
    grad_b = g2.sum(0) if ctx.has_bias else None
    return _as(grad_x, x.dtype), grad_w, grad_b


def _backward(ctx, grad):
    return (*masked_linear_backward(ctx, grad), None, None, None, None, None)


threshold_linear.register_autograd(_backward, setup_context=_setup_context)


# -- siblings: several weights, one input, one mask ----------------------------------------------


def _scale_of(weight_scales, i):
    return None if weight_scales is None else weight_scales[i]


def _check_group_args(x, weights, biases, center, channel_scale, center_biases, weight_scales=None) -> None:
    m = len(weights)
    torch._check(m >= 1, lambda: "threshold_linear_group: no weights")
    for what, ts in (("biases", biases), ("center_biases", center_biases)):
        torch._check(len(ts) in (0, m),
                     lambda what=what, ts=ts: f"threshold_linear_group: {what} must be empty or one per "
                     f"weight ({m}), got {len(ts)}")
    torch._check(weight_scales is None or len(weight_scales) == m,
                 lambda: f"threshold_linear_group: weight_scales must be None or one per weight ({m}), "
                 f"got {len(weight_scales)}")
    for i, w in enumerate(weights):
        _check_args(x, w, biases[i] if biases else None, center, channel_scale,
                    center_biases[i] if center_biases else None, _scale_of(weight_scales, i))


def threshold_linear_group_reference(x, weights, biases, threshold, center=None, channel_scale=None,
                                     weight_scales=None):
    """One masked input, then one dense linear per weight (``biases``: empty or one per weight;
    ``weight_scales``: None, or one per 8-bit weight)."""
    xm = torch.where(keep_mask_reference(x, threshold, center, channel_scale), x, fill_value(x, center))
    return [linear_reference(xm, w, biases[i] if biases else None, _scale_of(weight_scales, i))
            for i, w in enumerate(weights)]


_GROUP_SCHEMA = ("(Tensor x, Tensor[] weights, Tensor[] biases, float threshold, Tensor? center, "
                 "Tensor? channel_scale, Tensor[] center_biases, Tensor[]? weight_scales=None) -> Tensor[]")


# (an optional list of tensors has no Python annotation that infer_schema reads: schema given)
@torch.library.custom_op("fxsparse::threshold_linear_group", mutates_args=(), schema=_GROUP_SCHEMA)
def threshold_linear_group(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    threshold: float,
    center: Tensor | None,
    channel_scale: Tensor | None,
    center_biases: list[Tensor],
    weight_scales: list[Tensor] | None = None,
) -> list[Tensor]:
    """``[threshold_linear(x, W_i, b_i, threshold, center, channel_scale, cb_i, s_i) for each i]``.

    ``biases`` and ``center_biases`` are each empty (none) or one per weight; ``weight_scales``
    None (16-bit weights) or one per weight (8-bit weights, all of one dtype).
    """
    _check_group_args(x, weights, biases, center, channel_scale, center_biases, weight_scales)
    return threshold_linear_group_reference(x, weights, biases, threshold, center, channel_scale,
                                            weight_scales)


@threshold_linear_group.register_fake
def _(x, weights, biases, threshold, center, channel_scale, center_biases, weight_scales=None):
    _check_group_args(x, weights, biases, center, channel_scale, center_biases, weight_scales)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _threshold_linear_group_cuda(x, weights, biases, threshold, center, channel_scale, center_biases,
                                 weight_scales=None):
    """One fused GEMV launch for all weights when the kernel takes each; else one mask, then cuBLAS."""
    _check_group_args(x, weights, biases, center, channel_scale, center_biases, weight_scales)
    from . import sparse_gemv

    m = len(weights)
    if (m <= sparse_gemv.MAX_MEMBERS and len({w.dtype for w in weights}) == 1
            and all(sparse_gemv.supports(x, w, weight_scale=_scale_of(weight_scales, i))
                    for i, w in enumerate(weights))):
        return sparse_gemv.threshold_gemv_group(x, weights, list(biases) or [None] * m, threshold, center,
                                                channel_scale, list(center_biases) or [None] * m,
                                                weight_scales=weight_scales)
    if x.dtype in sparse_gemv._DTYPES:
        xm = sparse_gemv.masked_input(x, threshold, center, channel_scale)
        return [linear_reference(xm, w, biases[i] if biases else None, _scale_of(weight_scales, i))
                for i, w in enumerate(weights)]
    return threshold_linear_group_reference(x, weights, biases, threshold, center, channel_scale,
                                            weight_scales)


threshold_linear_group.register_kernel("cuda")(_threshold_linear_group_cuda)


def _group_setup_context(ctx, inputs, output):
    x, weights, biases, threshold, center, channel_scale, center_biases, weight_scales = (*inputs, None)[:8]
    keep = keep_mask_reference(x, threshold, center, channel_scale)
    ctx.quantized = weight_scales is not None
    ctx.n_scales = len(weight_scales) if ctx.quantized else 0
    if ctx.quantized:  # saved dequantized: x's gradient flows through them, they get none
        weights = [dequantize(w, sc) for w, sc in zip(weights, weight_scales, strict=True)]
    ctx.save_for_backward(x, keep, center, *weights)
    ctx.has_bias = bool(biases)
    ctx.n_cb = len(center_biases)


def _group_backward(ctx, grads):
    """Each member's ``masked_linear_backward``; the input gradients add up."""
    x, keep, center, *weights = ctx.saved_tensors
    xm = torch.where(keep, x, fill_value(x, center))
    xm2 = xm.reshape(-1, xm.shape[-1])
    grad_x = None
    grad_ws, grad_bs = [], []
    for w, g in zip(weights, grads, strict=True):
        gx = g @ _as(w, g.dtype)
        grad_x = gx if grad_x is None else grad_x + gx
        g2 = g.reshape(-1, g.shape[-1])
        grad_ws.append(None if ctx.quantized else _as(g2.t() @ _as(xm2, g.dtype), w.dtype))
        grad_bs.append(g2.sum(0))
    grad_x = _as(torch.where(keep, grad_x, torch.zeros((), dtype=grad_x.dtype)), x.dtype)
    # (the structure must mirror the inputs as called: a list per list argument, a defaulted
    # weight_scales absent; center_biases and weight scales are constants)
    return (grad_x, grad_ws, grad_bs if ctx.has_bias else [], None, None, None,
            [None] * ctx.n_cb, [None] * ctx.n_scales if ctx.quantized else None)[:len(ctx.needs_input_grad)]


threshold_linear_group.register_autograd(_group_backward, setup_context=_group_setup_context)


# -- activation prologue: threshold_linear(act(a) * b) -------------------------------------------


def _check_act(act: str) -> None:
    torch._check(act in ACTIVATIONS, lambda: f"threshold_linear_act: unknown activation {act!r}; "
                 f"known: {sorted(ACTIVATIONS)}")


def activation_reference(a: Tensor, act: str, b: Tensor | None = None) -> Tensor:
    """``act(a) * b`` (``act(a)`` without ``b``) as eager computes it: each op rounds to a's dtype."""
    _check_act(act)
    y = ACTIVATIONS[act](a)
    return y if b is None else y * b


def _check_multiplier(op: str, a: Tensor, b: Tensor | None, names: str = "b must match a") -> None:
    """The prologue's multiplier ``b`` has ``a``'s shape and dtype."""
    if b is not None:
        torch._check(b.shape == a.shape and b.dtype == a.dtype,
                     lambda: f"{op}: {names} ({tuple(a.shape)}, {a.dtype}), got {tuple(b.shape)}, {b.dtype}")


def _check_act_args(a, b, weight, bias, center, channel_scale, center_bias, act, weight_scale=None) -> None:
    _check_act(act)
    _check_multiplier("threshold_linear_act", a, b)
    _check_args(a, weight, bias, center, channel_scale, center_bias, weight_scale)


@torch.library.custom_op("fxsparse::threshold_linear_act", mutates_args=())
def threshold_linear_act(
    a: Tensor,
    b: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    threshold: float,
    center: Tensor | None,
    channel_scale: Tensor | None,
    center_bias: Tensor | None,
    act: str,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """``threshold_linear(act(a) * b, weight, bias, threshold, center, channel_scale, center_bias,
    weight_scale)``."""
    _check_act_args(a, b, weight, bias, center, channel_scale, center_bias, act, weight_scale)
    return threshold_linear_reference(activation_reference(a, act, b), weight, bias, threshold, center,
                                      channel_scale, weight_scale=weight_scale)


@threshold_linear_act.register_fake
def _(a, b, weight, bias, threshold, center, channel_scale, center_bias, act, weight_scale=None):
    _check_act_args(a, b, weight, bias, center, channel_scale, center_bias, act, weight_scale)
    return a.new_empty((*a.shape[:-1], weight.shape[0]))


def _threshold_linear_act_cuda(a, b, weight, bias, threshold, center, channel_scale, center_bias, act,
                               weight_scale=None):
    """The one-row kernel with the activation in its prologue; else the input, then as
    ``threshold_linear``."""
    _check_act_args(a, b, weight, bias, center, channel_scale, center_bias, act, weight_scale)
    from . import sparse_gemv

    if sparse_gemv.supports(a, weight, weight_scale=weight_scale) and (b is None or b.device == a.device):
        (out,) = sparse_gemv.threshold_gemv_group(
            a, [weight], [bias], threshold, center, channel_scale, [center_bias], act=act, x_mul=b,
            weight_scales=None if weight_scale is None else [weight_scale])
        return out
    return threshold_linear_cuda(activation_reference(a, act, b), weight, bias, threshold, center,
                                 channel_scale, center_bias, weight_scale)


threshold_linear_act.register_kernel("cuda")(_threshold_linear_act_cuda)


# -- float32 accumulation: acc += the layers' outputs, unrounded -----------------------------------


def layer_dtype(x: Tensor, weights: list[Tensor], weight_scales, dtype: torch.dtype | None) -> torch.dtype:
    """The activation dtype of ``threshold_linear_acc``'s layers: ``dtype``, else the weights'
    (16-bit weights) or x's (8-bit weights)."""
    if dtype is not None:
        return dtype
    return weights[0].dtype if weight_scales is None else x.dtype


def _check_acc_args(acc, x, x_mul, weights, biases, center, channel_scale, center_biases, act, zeros_shape,
                    weight_scales=None, dtype=None):
    op = "threshold_linear_acc"
    torch._check(len(weights) >= 1, lambda: f"{op}: no weights")
    wdtype = weights[0].dtype
    torch._check(all(w.dtype == wdtype for w in weights), lambda: f"{op}: weights of different dtypes")
    ldtype = layer_dtype(x, weights, weight_scales, dtype)
    if weight_scales is None:
        torch._check(ldtype == wdtype, lambda: f"{op}: dtype {dtype} differs from the weights' {wdtype}")
    else:
        torch._check(ldtype.is_floating_point and ldtype not in QUANT_DTYPES,
                     lambda: f"{op}: dtype must be the layers' 16/32-bit activation dtype, got {ldtype}")
    what = "the weights' dtype" if weight_scales is None else "the layers' activation dtype"
    torch._check(x.dtype in (ldtype, torch.float32),
                 lambda: f"{op}: x must be in {what} {ldtype} or float32, got {x.dtype}")
    n = sum(w.shape[0] for w in weights)
    torch._check(acc.dtype == torch.float32 and acc.shape == (*x.shape[:-1], n),
                 lambda: f"{op}: acc must be float32 of shape {(*x.shape[:-1], n)}, got {acc.dtype} "
                 f"{tuple(acc.shape)}")
    torch._check(all(d >= 0 for d in zeros_shape), lambda: f"{op}: negative zeros_shape {zeros_shape}")
    if act is not None:
        _check_act(act)
    else:
        torch._check(x_mul is None, lambda: f"{op}: x_mul without act")
    _check_multiplier(op, x, x_mul, "x_mul must match x")
    _check_group_args(x, weights, biases, center, channel_scale, center_biases, weight_scales)


def threshold_linear_acc_reference(x, x_mul, weights, biases, threshold, center, channel_scale, act,
                                   weight_scales=None, dtype=None):
    """The float32 outputs side by side: x (and x_mul) rounded to the layers' dtype
    (``layer_dtype``), the activation as eager computes it, the mask, then each linear (8-bit
    weights: dequantized) in float32 without rounding."""
    ldtype = layer_dtype(x, weights, weight_scales, dtype)
    x = _as(x, ldtype)
    if act is not None:
        x = activation_reference(x, act, None if x_mul is None else _as(x_mul, ldtype))
    xm = torch.where(keep_mask_reference(x, threshold, center, channel_scale), x, fill_value(x, center))
    xf = _as(xm, torch.float32)
    return torch.cat([linear_reference(xf, w if weight_scales is not None else _as(w, torch.float32),
                                       _as(biases[i], torch.float32) if biases else None,
                                       _scale_of(weight_scales, i), torch.float32)
                      for i, w in enumerate(weights)], dim=-1)


_ACC_SCHEMA = ("(Tensor(a0!) acc, Tensor x, Tensor? x_mul, Tensor[] weights, Tensor[] biases, "
               "float threshold, Tensor? center, Tensor? channel_scale, Tensor[] center_biases, str? act, "
               "SymInt[] zeros_shape, Tensor[]? weight_scales=None, ScalarType? dtype=None) -> Tensor")


@torch.library.custom_op("fxsparse::threshold_linear_acc", mutates_args=("acc",), schema=_ACC_SCHEMA)
def threshold_linear_acc(
    acc: Tensor,
    x: Tensor,
    x_mul: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    threshold: float,
    center: Tensor | None,
    channel_scale: Tensor | None,
    center_biases: list[Tensor],
    act: str | None,
    zeros_shape: list[int],
    weight_scales: list[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``acc += cat([threshold_linear(x', W_i, b_i, ...) for each i], -1)`` in float32, unrounded,
    where ``x' = act(x) * x_mul`` (``act`` optional, as ``threshold_linear_act``) with ``x`` and
    ``x_mul`` first rounded to the layers' dtype (so ``x`` may be another call's ``acc``): ``dtype``,
    by default the weights' (16-bit) or x's (8-bit weights, ``weight_scales`` one per weight; a
    float32 ``x`` feeding 16-bit layers then needs ``dtype``).
    Returns float32 zeros of ``zeros_shape``: the next such call's ``acc``, which on CUDA the
    same launch writes, so no fill kernel precedes it.

    On CUDA the one-row kernel adds each K-split's partial sum with atomics instead of having
    the last split reload and sum them all (~1.2-2.2 µs per call on an H200 at 50% sparsity,
    ``bench/results/gemv_accum_h200.md``); the order of those additions varies, so results are
    not bitwise reproducible run to run. Inference only (no autograd)."""
    args = (acc, x, x_mul, weights, biases, center, channel_scale, center_biases, act, zeros_shape)
    _check_acc_args(*args, weight_scales, dtype)
    acc += threshold_linear_acc_reference(x, x_mul, weights, biases, threshold, center, channel_scale, act,
                                          weight_scales, dtype)
    return acc.new_zeros(zeros_shape)


@threshold_linear_acc.register_fake
def _(acc, x, x_mul, weights, biases, threshold, center, channel_scale, center_biases, act, zeros_shape,
      weight_scales=None, dtype=None):
    _check_acc_args(acc, x, x_mul, weights, biases, center, channel_scale, center_biases, act, zeros_shape,
                    weight_scales, dtype)
    return acc.new_empty(zeros_shape)


def _threshold_linear_acc_cuda(acc, x, x_mul, weights, biases, threshold, center, channel_scale,
                               center_biases, act, zeros_shape, weight_scales=None, dtype=None):
    """The one-row kernel accumulating (``sparse_gemv.threshold_gemv_group(accumulate=...)``) when
    it takes every weight; else the reference on the device."""
    _check_acc_args(acc, x, x_mul, weights, biases, center, channel_scale, center_biases, act, zeros_shape,
                    weight_scales, dtype)
    from . import sparse_gemv

    m = len(weights)
    if (m <= sparse_gemv.MAX_MEMBERS and acc.is_contiguous() and (x_mul is None or x_mul.device == x.device)
            and all(sparse_gemv.supports(x, w, accumulate=True, weight_scale=_scale_of(weight_scales, i))
                    for i, w in enumerate(weights))):
        numel = math.prod(zeros_shape)
        zeros = sparse_gemv.threshold_gemv_group(
            x, weights, list(biases) or [None] * m, threshold, center, channel_scale,
            list(center_biases) or [None] * m, act=act, x_mul=x_mul, accumulate=acc, zeros_next=numel,
            weight_scales=weight_scales, dtype=layer_dtype(x, weights, weight_scales, dtype))
        return zeros.view(zeros_shape)
    acc += threshold_linear_acc_reference(x, x_mul, weights, biases, threshold, center, channel_scale, act,
                                          weight_scales, dtype)
    return acc.new_zeros(zeros_shape)


threshold_linear_acc.register_kernel("cuda")(_threshold_linear_acc_cuda)

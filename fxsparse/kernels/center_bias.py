"""``W @ center``, the bias a nonzero center folds into (SCAP's mode-centering, seed 001).

The kernels that skip columns add ``center_bias = W @ c`` instead of reading the dropped
columns, so it is computed once, when a model is compiled, not per call. A compiled graph
takes its weights as inputs, though: an in-place update after compiling (``load_state_dict``,
an optimizer step, ``p.data = ...``) must not leave a stale constant behind. Each folded value
is therefore registered with the weight's storage and version counter when it is made, and the
CUDA paths that add it call ``fresh_center_bias`` first, which recomputes it in place when the
weight changed (only values registered here: a caller's own tensor is never written). That
check runs on the host, so under CUDA graphs (``mode="reduce-overhead"``) a replay cannot see
it: there, recompile after changing weights in place.

8-bit weights (int8 or fp8 ``qdata`` with a per-output-channel float32 ``weight_scale``, as
torchao stores them) fold ``W_deq @ c`` of the dequantized weight in float32, with ``c`` rounded
to the layer's activation dtype; the stamp then covers the scale too, so a reloaded quantized
weight (new data or new scales) refreshes it the same way.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

# center_bias storage -> (weight storage, weight version[, scale storage, scale version]) it was
# computed from; an entry lives as long as its tensor, so a later tensor at the same address is
# never mistaken for it
_SOURCE: dict[int, tuple[int, ...]] = {}


def _stamp(weight: Tensor, weight_scale: Tensor | None = None) -> tuple[int, ...]:
    if weight_scale is None:
        return weight.data_ptr(), weight._version
    return weight.data_ptr(), weight._version, weight_scale.data_ptr(), weight_scale._version


def dequantize(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """``weight.float() * weight_scale[:, None]``: an 8-bit weight's float32 values."""
    scale = weight_scale if weight_scale.dtype == torch.float32 else weight_scale.float()  # never an alias
    return weight.float() * scale[:, None]


def center_bias_value(weight: Tensor, center: Tensor, weight_scale: Tensor | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """``W @ c`` in float32, with ``c`` rounded to the weight's dtype (the value dropped
    entries snap to) and the product computed in that dtype, as the lowering folds it.

    With ``weight_scale`` (8-bit ``weight``): ``c`` rounded to ``dtype`` (the layer's activation
    dtype; required), times the dequantized weight in float32."""
    if weight_scale is None:
        c = center.to(device=weight.device, dtype=weight.dtype).expand(weight.shape[1])
        with torch.no_grad():
            return F.linear(c, weight).float()
    torch._check(dtype is not None, lambda: "center_bias_value: an 8-bit weight needs the activation dtype")
    c = center.to(device=weight.device, dtype=dtype).float().expand(weight.shape[1])
    with torch.no_grad():
        return F.linear(c, weight.float()) * weight_scale.float()


def register_center_bias(center_bias: Tensor, weight: Tensor, weight_scale: Tensor | None = None) -> Tensor:
    """Record that ``center_bias`` was computed from ``weight`` (and its 8-bit scale) as they are
    now; returns it."""
    key = center_bias.data_ptr()
    _SOURCE[key] = _stamp(weight, weight_scale)
    weakref.finalize(center_bias, _SOURCE.pop, key, None)
    return center_bias


def fresh_center_bias(weight: Tensor, center: Tensor | None, center_bias: Tensor | None,
                      weight_scale: Tensor | None = None, dtype: torch.dtype | None = None) -> None:
    """Recompute a registered ``center_bias`` in place if ``weight`` changed since.

    Values this module did not register (a caller's own ``W @ c``) are left alone: the ops
    do not write their inputs. Nothing is checked while a CUDA graph is being captured (the
    graph would replay the check's decision, not make it again)."""
    if center_bias is None or center is None:
        return
    if center_bias.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    key = center_bias.data_ptr()
    seen = _SOURCE.get(key)
    if seen is None:
        return
    now = _stamp(weight, weight_scale)
    if seen != now:
        with torch.no_grad():
            center_bias.copy_(center_bias_value(weight, center, weight_scale, dtype))
        _SOURCE[key] = now

"""Reading 8-bit weight-only tensors that torchao made, for the sparse ops.

fxsparse does not quantize; it reads what ``torchao.quantization.quantize_`` left in a model's
linear layers. Two of its weight-only formats are read: ``Float8WeightOnlyConfig`` (a
``Float8Tensor``: fp8 e4m3 ``qdata`` [N, K], float32 ``scale``) and ``Int8WeightOnlyConfig``
(an ``Int8Tensor``: int8 ``qdata``, float32 ``scale``, zero ``zero_point``), each with one
scale per output channel (``PerRow``, their default) or one for the whole tensor
(``PerTensor``). The ops take ``qdata`` as their weight and the scale as ``weight_scale``
(float32 [N]; a per-tensor scale as a stride-0 view), so
``W = qdata.float() * weight_scale[:, None]``. Anything else torchao makes (per-group scales,
activation quantization, int4, other layouts) is reported unsupported with the reason, and
runs torchao's own path.

torchao is imported only when a tensor is one of its types: without it nothing here needs it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["WeightFormat", "is_torchao", "to_column_major", "weight_format"]

_PLAIN = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


class WeightFormat(NamedTuple):
    """How the sparse ops read a weight.

    ``kind``: ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"fp64"`` (a plain tensor; ``qdata`` is the
    weight itself), ``"fp8"`` or ``"int8"`` (``qdata`` the 8-bit data [N, K], ``scale`` float32
    [N]), or ``"unsupported"`` (``reason`` says why). ``dtype``: the layer's activation dtype
    (a torchao tensor's ``dtype``; the weight's own for plain tensors)."""

    kind: str
    qdata: Tensor | None
    scale: Tensor | None
    dtype: torch.dtype | None
    reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.kind in ("fp8", "int8")


def is_torchao(w: Tensor) -> bool:
    """Whether ``w`` is a torchao tensor subclass (no torchao import needed to ask)."""
    return type(w).__module__.split(".")[0] == "torchao"


def _unsupported(reason: str, dtype: torch.dtype | None = None) -> WeightFormat:
    return WeightFormat("unsupported", None, None, dtype, reason)


def _row_scale(w: Tensor, n: int, k: int) -> Tensor | str:
    """The float32 [N] per-output-channel scale of a torchao tensor, or why there is none."""
    block = list(getattr(w, "block_size", None) or [])
    scale = w.scale
    if scale.dtype != torch.float32:
        return f"scale dtype {scale.dtype} (float32 expected)"
    if block == [1, k] and scale.numel() == n:
        return scale.reshape(n)
    if (block in ([], [n, k])) and scale.numel() == 1:  # per tensor: a view, stride 0
        return scale.reshape(1).expand(n)
    return (f"scales per block {block} of a [{n}, {k}] weight (scale {tuple(scale.shape)}): the kernel "
            "reads one scale per output channel (PerRow or PerTensor)")


def _concrete(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def weight_format(w: Tensor) -> WeightFormat:
    """How the sparse ops can read ``w`` (a linear layer's weight): plain, 8-bit, or unsupported."""
    if not is_torchao(w):  # a plain tensor, or another subclass (DTensor: sharding.py's business)
        kind = _PLAIN.get(w.dtype)
        if kind is None:
            return _unsupported(f"a plain {w.dtype} weight without scales", w.dtype)
        return WeightFormat(kind, w, None, w.dtype)

    from torchao.quantization import Float8Tensor, Int8Tensor

    name = type(w).__name__
    dtype = getattr(w, "dtype", None)
    if not isinstance(w, (Float8Tensor, Int8Tensor)):
        return _unsupported(f"torchao {name}: fxsparse reads Float8Tensor and Int8Tensor", dtype)
    if getattr(w, "act_quant_kwargs", None) is not None:
        return _unsupported(f"torchao {name} quantizes activations too (not a weight-only config)", dtype)
    if getattr(w, "act_pre_scale", None) is not None:
        return _unsupported(f"torchao {name} with an activation pre-scale", dtype)
    q = w.qdata
    if q.dim() != 2:
        return _unsupported(f"torchao {name} of {q.dim()} dimensions", dtype)
    n, k = q.shape
    if isinstance(w, Float8Tensor):
        if q.dtype != torch.float8_e4m3fn:
            return _unsupported(f"torchao {name} of {q.dtype} (fxsparse reads float8_e4m3fn)", dtype)
        kind = "fp8"
    else:
        if q.dtype != torch.int8:
            return _unsupported(f"torchao {name} of {q.dtype}", dtype)
        zp = getattr(w, "zero_point", None)
        if zp is not None and _concrete(zp) and bool(zp.any()):
            return _unsupported(f"torchao {name} with nonzero zero points (asymmetric)", dtype)
        kind = "int8"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return _unsupported(f"torchao {name} of activation dtype {dtype}", dtype)
    scale = _row_scale(w, n, k)
    if isinstance(scale, str):
        return _unsupported(f"torchao {name}: {scale}", dtype)
    return WeightFormat(kind, q, scale, dtype)


@torch.no_grad()
def to_column_major(w: Tensor) -> bool:
    """Lay ``w``'s data out column-major in place (the sparse kernel's layout: one input channel
    is one contiguous run); the tensor (``nn.Parameter``) object is kept. A readable torchao
    tensor gets a column-major ``qdata``; a plain one new ``.data``. False when there was nothing
    to change (already column-major, or a format the kernel does not read)."""
    fmt = weight_format(w)
    if fmt.kind == "unsupported":
        return False
    q = fmt.qdata
    if q.stride(0) == 1 and q.stride(1) == q.shape[0]:
        return False
    if fmt.quantized:
        w.qdata = q.t().contiguous().t()
    else:
        w.data = q.data.t().contiguous().t()
    return True
